"""Peak memory of reading a tracks file the size of a 90-minute match with `tracks.read_tracks`:
5,400 frames (1 sample per second) of 25 objects (players of ~40 x 90 pixels, a ball) at 1080p,
every mask decoded once, in a process of its own.

Usage:
  python bench/tracks_reader_bench.py              # 5,400 frames
  python bench/tracks_reader_bench.py --frames 50  # the CI smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from pycocotools import mask as coco_mask

REPO = Path(__file__).resolve().parent.parent

HEIGHT, WIDTH, OBJECTS, POSES = 1080, 1920, 25, 30
READ_EVERY_MASK = """
import sys, resource, time
from sam3_pipeline.tracks import read_tracks
started = time.perf_counter()
frames = pixels = 0
for frame in read_tracks(sys.argv[1]):
    frames += 1
    for obj in frame.objects:
        pixels += int(obj.mask().sum())
print(frames, pixels, round(time.perf_counter() - started, 1), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""
# This process imports no PyTorch: Linux counts the peak RSS of a child from before its exec.
IMPORT_ONLY = "import resource, sam3_pipeline.tracks; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"


def frame_objects(rng: np.random.Generator) -> list[dict]:
    """One frame's objects as `outputs.object_records` writes them (the same RLE): ellipses in their boxes."""
    objects = []
    for index in range(OBJECTS):
        width, height = (10, 10) if index == OBJECTS - 1 else (40, 90)
        x0, y0 = int(rng.integers(0, WIDTH - width)), int(rng.integers(0, HEIGHT - height))
        ys, xs = np.ogrid[:height, :width]
        crop = (
            ((ys - height / 2 + 0.5) / (height / 2)) ** 2 + ((xs - width / 2 + 0.5) / (width / 2)) ** 2 <= 1
        ).astype(np.uint8)
        box = np.array([x0, y0, x0 + width - 1, y0 + height - 1])
        prompt = "ball" if index == OBJECTS - 1 else "soccer player"
        full = np.zeros((HEIGHT, WIDTH), dtype=np.uint8, order="F")
        full[y0 : y0 + height, x0 : x0 + width] = crop
        encoded = coco_mask.encode(full)
        mask = {"size": [HEIGHT, WIDTH], "counts": encoded["counts"].decode("ascii")}
        objects.append(
            {"id": index, "prompt": prompt, "score": 0.9, "box": box.tolist(), "area": int(crop.sum()), "mask": mask}
        )
    return objects


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=5400)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    poses = [frame_objects(rng) for _ in range(POSES)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "match_tracks.jsonl"
        with path.open("w") as tracks:
            for frame in range(args.frames):
                line = {"frame": frame, "source_frame": frame * 25, "timestamp": float(frame), "objects": poses[frame % POSES]}
                tracks.write(json.dumps(line, separators=(",", ":")) + "\n")
        command = [sys.executable, "-c", READ_EVERY_MASK, str(path)]
        frames, pixels, seconds, peak_mb = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()
        baseline = subprocess.run(
            [sys.executable, "-c", IMPORT_ONLY], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
        result = {
            "frames": int(frames),
            "objects": int(frames) * OBJECTS,
            "file_mb": round(path.stat().st_size / 1e6, 1),
            "mask_pixels": int(pixels),
            "seconds": float(seconds),
            "peak_rss_mb": int(peak_mb),
            "peak_rss_after_imports_mb": int(baseline),
            "all_masks_decoded_at_once_gb": round(int(frames) * OBJECTS * HEIGHT * WIDTH / 1e9, 1),
        }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
