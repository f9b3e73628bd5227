"""Speed and memory of process_segmentation.py against the upstream example's approach.

Both run on the same synthetic 720p clip with the same tiny random SAM3 (tests/make_tiny_sam3.py)
set up to track ~20 objects, so the numbers measure the pipeline around the model, not SAM3:
  ours   streaming decode -> SAM3 -> box-local masks and overlay -> H.264, chunked sessions
  naive  the upstream example's approach: every sampled frame decoded into RAM first, one SAM3
         session over all of them, transformers' postprocess_outputs, a float32 mask per object
         per frame kept for the whole video, a float blend per mask, OpenCV mp4v output
Each measurement runs in its own process so that its peak RSS is its own.

Usage:
  python bench/benchmark.py                    # 60 and 600 frames, prints a table
  python bench/benchmark.py --readme README.md # also writes the table into the README
  python bench/benchmark.py --small            # a few small frames: the CI smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

PROMPTS = ["soccer player", "ball"]
README_START, README_END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"
MEMORY_HEADROOM = 0.6  # run the naive approach only when its estimated RSS fits in this share of RAM


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_ours(clip: Path, model_dir: Path, frames: int, workdir: Path) -> dict:
    import process_segmentation as ps

    code = ps.main(
        [
            str(clip),
            "--output-dir",
            str(workdir),
            "--model",
            str(model_dir),
            "--device",
            "cpu",
            "--sample-fps",
            "0",
            "--max-frames",
            str(frames),
            "--prompts",
            *PROMPTS,
        ]
    )
    if code != 0:
        raise SystemExit(f"process_segmentation.py exited {code}")
    metadata = json.loads((workdir / clip.stem / f"{clip.stem}_metadata.json").read_text())
    return {"frames": metadata["frames_processed"], "seconds": metadata["processing_seconds"]}


def run_naive(clip: Path, model_dir: Path, frames: int, workdir: Path) -> dict:
    """The upstream example's approach, re-implemented: hold everything, then write mp4v."""
    import cv2
    import numpy as np
    import torch
    from PIL import Image
    from transformers import Sam3VideoModel, Sam3VideoProcessor

    model = Sam3VideoModel.from_pretrained(model_dir).eval()
    processor = Sam3VideoProcessor.from_pretrained(model_dir)
    started = time.monotonic()
    capture = cv2.VideoCapture(str(clip))
    fps = capture.get(cv2.CAP_PROP_FPS)
    images = []
    while len(images) < frames:
        ok, bgr = capture.read()
        if not ok:
            break
        images.append(Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
    capture.release()

    session = processor.init_video_session(
        video=images,
        inference_device="cpu",
        processing_device="cpu",
        video_storage_device="cpu",
        dtype=torch.float32,
    )
    processor.add_text_prompt(inference_session=session, text=PROMPTS)
    masks_by_frame: dict[int, dict[int, np.ndarray]] = {}
    with torch.no_grad():
        for output in model.propagate_in_video_iterator(
            inference_session=session, max_frame_num_to_track=len(images)
        ):
            result = processor.postprocess_outputs(session, output)
            masks_by_frame[output.frame_idx] = {
                int(obj_id): (result["masks"][i].float().cpu().numpy() > 0).astype(np.float32)
                for i, obj_id in enumerate(result["object_ids"])
            }

    drawn = []
    for index, image in enumerate(images):
        blended = np.array(image, dtype=np.float32) / 255.0
        for obj_id, mask in masks_by_frame.get(index, {}).items():
            color = np.array((255, 100, 100) if obj_id % 2 else (100, 255, 100), dtype=np.float32) / 255.0
            blended = blended * (1 - 0.5 * mask[..., None]) + color * (0.5 * mask[..., None])
        drawn.append(Image.fromarray((blended * 255).clip(0, 255).astype(np.uint8)))
    height, width = np.array(drawn[0]).shape[:2]
    writer = cv2.VideoWriter(
        str(workdir / "naive.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height)
    )
    for image in drawn:
        writer.write(cv2.cvtColor(np.array(image), cv2.COLOR_RGB2BGR))
    writer.release()
    return {"frames": len(images), "seconds": round(time.monotonic() - started, 3)}


def worker(approach: str, clip: Path, model_dir: Path, frames: int) -> None:
    """One measurement, in this process; prints its result as JSON on the last line."""
    import torch

    torch.set_num_threads(1)  # the same for both; one thread was fastest on the 2-core CI machine
    with tempfile.TemporaryDirectory() as workdir:
        result = (run_ours if approach == "ours" else run_naive)(clip, model_dir, frames, Path(workdir))
    result["frames_per_second"] = round(result["frames"] / result["seconds"], 3)
    result["peak_rss_mb"] = round(peak_rss_mb())
    print(json.dumps(result))


def measure(approach: str, clip: Path, model_dir: Path, frames: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        approach,
        "--clip",
        str(clip),
        "--model-dir",
        str(model_dir),
        "--frames",
        str(frames),
    ]
    completed = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    if completed.returncode != 0:
        raise SystemExit(f"{approach} with {frames} frames failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def naive_estimate_gb(frames: int, width: int, height: int, objects: int) -> float:
    """RSS the naive approach needs for its frames, drawn frames and float32 masks."""
    return frames * width * height * (3 + 3 + 4 * objects) / 1e9


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, CPU only, 1 torch thread"


def table(rows: list[dict], size: tuple[int, int], objects: int) -> str:
    lines = [
        f"Synthetic {size[0]}x{size[1]} clip, tiny random SAM3 tracking {objects} objects, every frame sampled. "
        f"Machine: {machine()}.",
        "",
        "| sampled frames | ours frames/s | naive frames/s | speed-up | ours peak RSS | naive peak RSS |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        ours, naive = row["ours"], row["naive"]
        if "skipped" in naive:
            naive_fps, speedup, naive_rss = "not run", "-", naive["skipped"]
        else:
            naive_fps = f"{naive['frames_per_second']:.2f}"
            speedup = f"{ours['frames_per_second'] / naive['frames_per_second']:.1f}x"
            naive_rss = f"{naive['peak_rss_mb']:,} MB"
        lines.append(
            f"| {row['frames']} | {ours['frames_per_second']:.2f} | {naive_fps} | {speedup} "
            f"| {ours['peak_rss_mb']:,} MB | {naive_rss} |"
        )
    first, last = rows[0]["ours"], rows[-1]["ours"]
    lines += [
        "",
        f"Ours: peak RSS at {rows[-1]['frames']} frames is {last['peak_rss_mb'] / first['peak_rss_mb']:.2f}x "
        f"that at {rows[0]['frames']} frames.",
    ]
    return "\n".join(lines)


def write_readme(readme: Path, text: str) -> None:
    content = readme.read_text()
    start, end = content.index(README_START) + len(README_START), content.index(README_END)
    readme.write_text(content[:start] + "\n" + text + "\n" + content[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--frames", type=int, nargs="+", default=[60, 600], help="sampled frame counts to measure"
    )
    parser.add_argument("--size", default="1280x720", help="clip size WIDTHxHEIGHT")
    parser.add_argument("--objects-per-prompt", type=int, default=10, help="objects per prompt (2 prompts)")
    parser.add_argument(
        "--small", action="store_true", help="smoke run: 3 and 6 frames at 320x180, 2 objects per prompt"
    )
    parser.add_argument(
        "--readme", type=Path, help="write the table between the benchmark markers of this file"
    )
    parser.add_argument("--worker", choices=("ours", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--clip", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.clip, args.model_dir, args.frames[0])
        return 0
    if args.small:
        args.frames, args.size, args.objects_per_prompt = [3, 6], "320x180", 2
    width, height = map(int, args.size.split("x"))
    objects = 2 * args.objects_per_prompt

    import make_tiny_sam3
    from conftest import write_test_video

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = make_tiny_sam3.save_tiny_sam3(
            Path(scratch) / "model", len(PROMPTS), args.objects_per_prompt
        )
        clip = write_test_video(
            Path(scratch) / "clip.mp4", seconds=max(args.frames) / 10, fps=10, size=(width, height)
        )
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
        rows = []
        for frames in sorted(args.frames):
            row = {"frames": frames, "ours": measure("ours", clip, model_dir, frames)}
            needed = naive_estimate_gb(frames, width, height, objects)
            if needed > MEMORY_HEADROOM * memory_gb:
                row["naive"] = {"skipped": f"~{needed:.0f} GB (est.), over this machine's {memory_gb:.0f} GB"}
            else:
                row["naive"] = measure("naive", clip, model_dir, frames)
            print(json.dumps(row), flush=True)
            rows.append(row)
    text = table(rows, (width, height), objects)
    print(text)
    if args.readme:
        write_readme(args.readme, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
