"""Whether one GPU holds K SAM3 processes side by side: the check behind the job's PROCESSES_PER_GPU.

The job's run block runs this before it starts K processes over sub-shares of its share, so that
a K too large for the card stops the job in one line instead of failing windows out of memory.

Usage:
  python -m sam3_pipeline.gpu_share K [--chunk-frames 100] [--objects 25] [--device cuda]

Exit status: 0 when K processes fit in the GPU's free memory (or SAM3 runs on the CPU), 2 when not.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

# The full-size SAM3 in bfloat16 with transformers' own step, H200, 2026-11-26
# (docs/performance.md): 3.5 GB at the start of a window, then 6 MB per stored frame and 3 MB per
# object per stored frame.
BASE_GB = 3.5
FRAME_MB = 6.0
OBJECT_FRAME_MB = 3.0
# Frames a session keeps with the fast step (model_step.prune_session): the 16 the tracker reads
# back, and the current one.
FAST_STEP_FRAMES = 17
HEADROOM = 0.9  # the share of free memory the processes may plan to use: the allocator fragments


def process_gb(chunk_frames: int, objects: int) -> float:
    """An upper bound of one SAM3 process's GPU memory at this window size and object count: the
    stock step's measured growth over the frames the fast step keeps (it keeps less of each)."""
    frames = min(chunk_frames, FAST_STEP_FRAMES)
    return BASE_GB + frames * (FRAME_MB + OBJECT_FRAME_MB * objects) / 1000


def refusal(processes: int, chunk_frames: int, objects: int, free_gb: float) -> str | None:
    """Why `processes` SAM3 processes do not fit in `free_gb` of GPU memory, or None if they do."""
    each = process_gb(chunk_frames, objects)
    if processes * each <= free_gb * HEADROOM:
        return None
    fits = int(free_gb * HEADROOM // each)
    if not fits:
        return (
            f"PROCESSES_PER_GPU={processes}: one SAM3 process needs about {each:.1f} GB "
            f"and the GPU has {free_gb:.1f} GB free"
        )
    return (
        f"PROCESSES_PER_GPU={processes}: {processes} SAM3 processes need about {processes * each:.1f} GB "
        f"({each:.1f} GB each at {chunk_frames} frames per window and {objects} objects per frame) and the GPU "
        f"has {free_gb:.1f} GB free: use PROCESSES_PER_GPU={fits}" + (" or fewer" if fits > 1 else "")
    )

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("processes", type=int, help="SAM3 processes to run side by side on one GPU (1 or more)")
    parser.add_argument("--chunk-frames", type=int, default=100, help="sampled frames per window (default 100)")
    parser.add_argument("--objects", type=int, default=25, help="objects per frame to plan for (default 25)")
    parser.add_argument(
        "--device", choices=("auto", "cuda", "cpu"), default="auto", help="where SAM3 runs (default auto)"
    )
    args = parser.parse_args(argv)
    import torch

    if args.device == "cpu" or not torch.cuda.is_available():
        return 0  # no GPU memory to share; --device cuda's own check names a missing GPU
    free, total = torch.cuda.mem_get_info()
    reason = refusal(args.processes, args.chunk_frames, args.objects, free / 1e9)
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    print(
        f"{args.processes} SAM3 process(es) on {torch.cuda.get_device_name()}: about "
        f"{args.processes * process_gb(args.chunk_frames, args.objects):.1f} GB of {free / 1e9:.1f} GB free "
        f"({total / 1e9:.1f} GB)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
