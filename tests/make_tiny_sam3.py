"""Build a tiny, randomly initialised SAM3 video model and processor, offline.

The real `Sam3VideoModel` / `Sam3VideoProcessor` code runs unchanged; only the sizes are tiny
and the weights random. Thresholds and three biases are set so that the random model reports
the same objects (one per prompt by default) on every frame, which gives the tests something
to check.

Usage:
    python tests/make_tiny_sam3.py DIR [--num-prompts 2] [--objects-per-prompt 1]
    python process_segmentation.py video.mp4 --model DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTokenizer,
    Sam2VideoVideoProcessor,
    Sam3ImageProcessor,
    Sam3VideoConfig,
    Sam3VideoModel,
    Sam3VideoProcessor,
)

IMAGE_SIZE = 56
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE  # 4x4 tokens
HIDDEN = 128  # must be a multiple of 64 and > 64 (smaller sizes fail with shape errors)
MLP = 64
TEXT_CONTEXT = 32  # the processor pads every prompt to 32 tokens
START_TOKEN_ID, END_TOKEN_ID = 512, 513


# The full-size SAM3's layer counts (`Sam3VideoConfig()`'s defaults), for `full_depth`.
FULL_DEPTH = {
    "backbone_layers": 32,
    "global_attn_indexes": [7, 15, 23, 31],
    "detr_layers": 6,
    "geometry_layers": 3,
    "tracker_decoder_layers": 2,
    "memory_attention_layers": 4,
    "memory_fuser_layers": 2,
    "num_maskmem": 7,
}


def tiny_config(
    num_prompts: int = 2, objects_per_prompt: int = 1, det_nms_thresh: float = 0.0, full_depth: bool = False
) -> Sam3VideoConfig:
    """A SAM3 video config small enough for CPU tests; each prompt yields `objects_per_prompt`
    objects per frame (one detection query each). The random queries of one prompt find the same
    blob, so with `det_nms_thresh` > 0 SAM3's detection NMS leaves one of them. `full_depth`: the
    full-size model's layer counts and memory frames at the tiny widths, so that a frame runs the
    same operations as the full model's, cheaply (for counting them)."""
    attention = {"num_attention_heads": 2, "intermediate_size": MLP}
    backbone = {
        "model_type": "sam3_vit_model",
        "hidden_size": 32,
        "intermediate_size": MLP,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "window_size": 2,
        "global_attn_indexes": [1],
        "pretrain_image_size": IMAGE_SIZE,
    }
    vision = {
        "model_type": "sam3_vision_model",
        "backbone_config": backbone,
        "fpn_hidden_size": HIDDEN,
        "backbone_feature_sizes": [[4 * GRID, 4 * GRID], [2 * GRID, 2 * GRID], [GRID, GRID]],
    }
    detector = {
        "model_type": "sam3",
        "vision_config": vision,
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": END_TOKEN_ID + 1,
            "hidden_size": 32,
            "intermediate_size": MLP,
            "projection_dim": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": TEXT_CONTEXT,
            "bos_token_id": START_TOKEN_ID,
            "eos_token_id": END_TOKEN_ID,
            "pad_token_id": END_TOKEN_ID,
        },
        "geometry_encoder_config": {"hidden_size": HIDDEN, "num_layers": 1, "roi_size": 1, **attention},
        "detr_encoder_config": {"hidden_size": HIDDEN, "num_layers": 1, **attention},
        "detr_decoder_config": {
            "hidden_size": HIDDEN,
            "num_layers": 1,
            "num_queries": objects_per_prompt,
            **attention,
        },
        "mask_decoder_config": {"hidden_size": HIDDEN, "num_upsampling_stages": 3, "num_attention_heads": 2},
    }
    tracker = {
        "model_type": "sam3_tracker_video",
        "vision_config": vision,
        "image_size": IMAGE_SIZE,
        "prompt_encoder_config": {"hidden_size": HIDDEN, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE},
        "mask_decoder_config": {
            "hidden_size": HIDDEN,
            "mlp_dim": MLP,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": HIDDEN,
        },
        "num_maskmem": 3,
        "memory_attention_hidden_size": HIDDEN,
        "memory_attention_num_layers": 1,
        "memory_attention_feed_forward_hidden_size": MLP,
        "memory_attention_rope_feat_sizes": [GRID, GRID],
        "memory_encoder_hidden_size": HIDDEN,
        "memory_encoder_output_channels": 64,  # hard-coded kv_in_dim in the memory attention
        "mask_downsampler_embed_dim": HIDDEN,
        "memory_fuser_embed_dim": HIDDEN,
        "memory_fuser_intermediate_dim": MLP,
        "memory_fuser_num_layers": 1,
    }
    if full_depth:
        backbone.update(
            num_hidden_layers=FULL_DEPTH["backbone_layers"], global_attn_indexes=FULL_DEPTH["global_attn_indexes"]
        )
        for part in ("detr_encoder_config", "detr_decoder_config"):
            detector[part]["num_layers"] = FULL_DEPTH["detr_layers"]
        detector["geometry_encoder_config"]["num_layers"] = FULL_DEPTH["geometry_layers"]
        tracker["mask_decoder_config"]["num_hidden_layers"] = FULL_DEPTH["tracker_decoder_layers"]
        tracker["memory_attention_num_layers"] = FULL_DEPTH["memory_attention_layers"]
        tracker["memory_fuser_num_layers"] = FULL_DEPTH["memory_fuser_layers"]
        tracker["num_maskmem"] = FULL_DEPTH["num_maskmem"]
    return Sam3VideoConfig(
        detector_config=detector,
        tracker_config=tracker,
        low_res_mask_size=4 * GRID,
        # Random weights score ~0.26: zero thresholds make every prompt yield its one query.
        score_threshold_detection=0.0,
        new_det_thresh=0.0,
        det_nms_thresh=det_nms_thresh,
        max_num_objects=num_prompts * objects_per_prompt,
        hotstart_delay=0,
    )


def tiny_model(
    num_prompts: int = 2,
    objects_per_prompt: int = 1,
    seed: int = 0,
    det_nms_thresh: float = 0.0,
    full_depth: bool = False,
) -> Sam3VideoModel:
    """A random tiny SAM3 video model, in eval mode, that emits `objects_per_prompt` objects per prompt."""
    torch.manual_seed(seed)
    config = tiny_config(num_prompts, objects_per_prompt, det_nms_thresh, full_depth)
    return report_objects(Sam3VideoModel(config).eval())


def report_objects(model: Sam3VideoModel) -> Sam3VideoModel:
    """Fill three biases of a randomly initialised SAM3 so that it reports its objects on every
    frame (with the zero thresholds of its config); returns the same model."""
    with torch.no_grad():
        # Without these the tracker calls its objects absent and some masks come out empty.
        model.tracker_model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(10.0)
        model.detector_model.mask_decoder.mask_embedder.layers[-1].bias.fill_(1.0)
        model.detector_model.mask_decoder.instance_projection.bias.fill_(1.0)
    return model


def tiny_processor() -> Sam3VideoProcessor:
    """A processor with the tiny input size and a merge-free byte-level CLIP tokenizer."""
    symbols = ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(symbols))}
    vocab.update({symbol + "</w>": index + len(symbols) for index, symbol in enumerate(sorted(symbols))})
    vocab.update({"<|startoftext|>": START_TOKEN_ID, "<|endoftext|>": END_TOKEN_ID})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    return Sam3VideoProcessor(
        image_processor=Sam3ImageProcessor(size=size, mask_size={"height": 16, "width": 16}),
        video_processor=Sam2VideoVideoProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tokenizer,
    )


def save_tiny_sam3(
    directory: Path, num_prompts: int = 2, objects_per_prompt: int = 1, det_nms_thresh: float = 0.0
) -> Path:
    """Save model + processor so that `from_pretrained(directory)` loads them offline."""
    directory.mkdir(parents=True, exist_ok=True)
    tiny_model(num_prompts, objects_per_prompt, det_nms_thresh=det_nms_thresh).save_pretrained(directory)
    tiny_processor().save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="where to save the model directory")
    parser.add_argument(
        "--num-prompts", type=int, default=2, help="prompts the model will be given (default 2)"
    )
    parser.add_argument(
        "--objects-per-prompt", type=int, default=1, help="objects each prompt yields per frame (default 1)"
    )
    parser.add_argument(
        "--det-nms-thresh",
        type=float,
        default=0.0,
        help="SAM3's detection NMS mask-IoU threshold (default 0: off; the real SAM3 uses 0.1)",
    )
    args = parser.parse_args(argv)
    print(save_tiny_sam3(args.directory, args.num_prompts, args.objects_per_prompt, args.det_nms_thresh))
    return 0


if __name__ == "__main__":
    sys.exit(main())
