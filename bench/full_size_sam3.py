"""Build the full-size SAM3 video model (default `Sam3VideoConfig`, ~860M parameters) with random
weights, offline.

Its compute and memory per frame are the real model's; its masks are meaningless. Thresholds and
three biases are set, as for the tiny test model (tests/make_tiny_sam3.py), so that random weights
report objects: each prompt yields up to `objects_per_prompt` objects (one detection query each).

Usage:
    python bench/full_size_sam3.py DIR [--num-prompts 2] [--objects-per-prompt 10]
    python process_segmentation.py video.mp4 --model DIR
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from transformers import (
    Sam2VideoVideoProcessor,
    Sam3ImageProcessor,
    Sam3VideoConfig,
    Sam3VideoModel,
    Sam3VideoProcessor,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import make_tiny_sam3  # noqa: E402  (its byte-level tokenizer fits the full-size text encoder too)

IMAGE_SIZE = 1008  # the released checkpoint's input size
COMPLETE_MARKER = "build-complete"  # written last, so an interrupted build is redone


def full_size_config(num_prompts: int = 2, objects_per_prompt: int = 10) -> Sam3VideoConfig:
    """The default (full-size) SAM3 video config, set up to report `objects_per_prompt` objects
    per prompt. det_nms_thresh stays 0: mask NMS over many zero-threshold queries explodes memory."""
    base = Sam3VideoConfig()
    detector = base.detector_config.to_dict()
    detector["detr_decoder_config"]["num_queries"] = objects_per_prompt
    return Sam3VideoConfig(
        detector_config=detector,
        tracker_config=base.tracker_config.to_dict(),
        score_threshold_detection=0.0,
        new_det_thresh=0.0,
        det_nms_thresh=0.0,
        max_num_objects=num_prompts * objects_per_prompt,
        hotstart_delay=0,
    )


def full_size_model(num_prompts: int = 2, objects_per_prompt: int = 10, seed: int = 0) -> Sam3VideoModel:
    """A random full-size SAM3 video model, in eval mode, that reports objects on every frame."""
    torch.manual_seed(seed)
    return make_tiny_sam3.report_objects(Sam3VideoModel(full_size_config(num_prompts, objects_per_prompt)).eval())


def full_size_processor() -> Sam3VideoProcessor:
    """The released processor's sizes (1008 px input, 288 px masks) with a hub-free tokenizer."""
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    return Sam3VideoProcessor(
        image_processor=Sam3ImageProcessor(),
        video_processor=Sam2VideoVideoProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=make_tiny_sam3.tiny_processor().tokenizer,
    )


def save_full_size_sam3(directory: Path, num_prompts: int = 2, objects_per_prompt: int = 10) -> Path:
    """Save model + processor for `from_pretrained(directory)`; a complete earlier build is reused."""
    marker = directory / COMPLETE_MARKER
    if marker.is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    full_size_model(num_prompts, objects_per_prompt).save_pretrained(directory)
    full_size_processor().save_pretrained(directory)
    marker.write_text(f"{num_prompts} prompts x {objects_per_prompt} objects\n")
    return directory


def save_object_limit_variant(base: Path, directory: Path, max_num_objects: int) -> Path:
    """The model saved in `base`, tracking at most `max_num_objects` objects: its own config and
    processor, the same weights (a symlink, no copy). It sees as many detections per frame as `base`."""
    marker = directory / COMPLETE_MARKER
    if marker.is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = Sam3VideoConfig.from_pretrained(base)
    config.max_num_objects = max_num_objects
    config.save_pretrained(directory)
    for path in base.iterdir():
        if path.name.endswith(".safetensors") or path.name.endswith(".safetensors.index.json"):
            (directory / path.name).unlink(missing_ok=True)
            (directory / path.name).symlink_to(path.resolve())
        elif path.name not in ("config.json", COMPLETE_MARKER):
            shutil.copy2(path, directory / path.name)
    marker.write_text(f"{base} tracking at most {max_num_objects} objects\n")
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="where to save the model directory (~3.3 GB)")
    parser.add_argument("--num-prompts", type=int, default=2, help="prompts the model will be given")
    parser.add_argument("--objects-per-prompt", type=int, default=10, help="objects each prompt yields")
    args = parser.parse_args(argv)
    print(save_full_size_sam3(args.directory, args.num_prompts, args.objects_per_prompt))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
