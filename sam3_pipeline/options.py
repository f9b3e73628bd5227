"""The script's options: parsing, defaults and the checks that need no file or model."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from sam3_pipeline.device import DTYPES
from sam3_pipeline.model_step import FAST, MODEL_STEPS
from sam3_pipeline.sam3 import DEFAULT_CHUNK_FRAMES

DEFAULT_MODEL = "facebook/sam3"
DEFAULT_PROMPTS = ("soccer player", "ball")
DEFAULT_SAMPLE_FPS = Fraction(1)
# Frames further apart than this share nothing for SAM3 to track: one per hour is already a series
# of stills. Below it a typo (0.0004 for 0.04) would quietly process almost nothing.
MIN_SAMPLE_FPS = Fraction(1, 3600)
# How late one worker sees another's writes in the output folder: SkyPilot's MOUNT_CACHED bucket
# shows them after rclone's upload and the reader's 10 s directory cache, 10-20 s (`--bucket-lag`).
DEFAULT_BUCKET_LAG = 30.0


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What every window of a run is computed with, whatever its video: a window computed with
    other settings is not reused (`record` is what its record keeps of them)."""

    prompts: tuple[str, ...]
    sample_fps: Fraction
    max_frames: int  # 0: no limit
    chunk_frames: int
    model: str
    tracks: bool

    @classmethod
    def of(cls, args: argparse.Namespace) -> RunSettings:
        return cls(tuple(args.prompts), args.sample_fps, args.max_frames, args.chunk_frames, args.model, args.tracks)

    def record(self) -> dict[str, Any]:
        return {
            "prompts": list(self.prompts),
            "sample_fps": str(self.sample_fps),
            "max_frames": self.max_frames,
            "chunk_frames": self.chunk_frames,
            "model": self.model,
            "tracks": self.tracks,
        }


@dataclasses.dataclass(frozen=True)
class Share:
    """This job's place in its launch: share `index` of `count`, and how late the other jobs'
    writes may show here (`bucket_lag` seconds: 0 when it is alone)."""

    index: int
    count: int
    bucket_lag: float

    @classmethod
    def of(cls, args: argparse.Namespace) -> Share:
        return cls(args.shard_index, args.num_shards, args.bucket_lag)


def default_output_dir() -> Path:
    """Under /outputs when it exists (the bucket mounted by the SkyPilot YAMLs), else here."""
    outputs = Path("/outputs")
    return outputs / "segmentation_results" if outputs.is_dir() else Path("segmentation_results")


def seconds(text: str) -> float:
    """--bucket-lag: seconds, from 0 to an hour."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 0 and 3600 seconds, got {text}")
    return value


def sample_rate(text: str) -> Fraction:
    """--sample-fps: a decimal or a fraction ("0.5", "30000/1001"), kept exact so that the rate
    sampled, the MP4's frame rate and the one recorded are the same number."""
    try:
        rate = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}") from None
    # FFmpeg keeps rates as 32-bit fractions; a microsecond-exact rate is plenty.
    return rate.limit_denominator(1_000_000)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Text-prompted video segmentation with SAM3: overlay MP4 + metadata JSON per video.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "inputs", nargs="*", type=Path, help="video files or folders of videos (searched recursively)"
    )
    parser.add_argument("--output-dir", type=Path, default=default_output_dir(), help="where results go")
    parser.add_argument(
        "--prompts", nargs="+", default=list(DEFAULT_PROMPTS), help="text prompts, one object class each"
    )
    parser.add_argument(
        "--sample-fps",
        type=sample_rate,
        default=DEFAULT_SAMPLE_FPS,
        help="frames per second of video time to process, a decimal or fraction (30000/1001); "
        "at least 1/3600 (one per hour); 0 = every frame",
    )
    parser.add_argument(
        "--max-frames",
        type=int,
        default=0,
        help="stop each video after this many sampled frames; 0 = no limit",
    )
    parser.add_argument(
        "--chunk-frames",
        type=int,
        default=DEFAULT_CHUNK_FRAMES,
        help="sampled frames per window: one SAM3 session (bounds memory) and the unit of work",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hugging Face model ID or local directory")
    parser.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="auto = cuda when available, else cpu with a warning; cuda = fail at once without a usable GPU",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="model precision; auto = bfloat16 on GPUs that support it, else float32",
    )
    parser.add_argument(
        "--model-step",
        choices=MODEL_STEPS,
        default=FAST,
        help="fast = SAM3's step per frame with our changes to transformers' (docs/how-it-works.md), which fall "
        "back to stock with a warning on a transformers they were not checked against; stock = transformers' own",
    )
    parser.add_argument(
        "--check-device",
        action="store_true",
        help="process nothing; print the device and precision a run would use, or why it cannot (exit 2)",
    )
    parser.add_argument(
        "--serial",
        action="store_true",
        help="decode, run SAM3 and write outputs one after another in one thread rather than side by side "
        "(the same outputs, slower; for comparison)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="redo videos whose results are already complete"
    )
    parser.set_defaults(tracks=True)  # not the flag's own default: --help would print "(default: True)"
    parser.add_argument(
        "--no-tracks",
        dest="tracks",
        action="store_false",
        default=argparse.SUPPRESS,
        help="skip the per-frame tracks (JSONL with COCO RLE masks, MOT text)",
    )
    parser.add_argument(
        "--shard-index", type=int, default=0, help="which share of all videos' windows this process computes (0-based)"
    )
    parser.add_argument("--num-shards", type=int, default=1, help="how many shares the windows are split into")
    parser.add_argument(
        "--bucket-lag",
        type=seconds,
        default=DEFAULT_BUCKET_LAG,
        metavar="SECONDS",
        help="with --num-shards > 1: how late other jobs' writes to --output-dir may show here (a SkyPilot "
        "MOUNT_CACHED bucket: 10-20 s). The job waits this long at its end, assembling the videos that other jobs' "
        "last windows complete; a result younger than this that misses a file is still arriving, not redone",
    )
    parser.add_argument(
        "--summarize",
        type=Path,
        metavar="DIR",
        help="run no model; assemble videos whose windows are all done, then write DIR/summary.json and "
        "DIR/summary.csv (done / partial / failed / missing per video) and the results page DIR/index.html. "
        "INPUTs, if given, are the videos expected in DIR",
    )
    args = parser.parse_args(argv)
    if not args.inputs and args.summarize is None and not args.check_device:
        parser.error("the following arguments are required: inputs (or --summarize DIR, or --check-device)")
    if args.max_frames < 0:
        parser.error(f"--max-frames must be 0 or more, got {args.max_frames}")
    if args.chunk_frames < 2:
        parser.error(f"--chunk-frames must be 2 or more (windows share one frame), got {args.chunk_frames}")
    if args.sample_fps < 0 or 0 < args.sample_fps < MIN_SAMPLE_FPS:
        parser.error(
            f"--sample-fps must be 0 (every frame) or at least {MIN_SAMPLE_FPS} (one frame per hour), "
            f"got {float(args.sample_fps):g}"
        )
    if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        parser.error(
            f"--shard-index must be in [0, --num-shards), got {args.shard_index} of {args.num_shards}"
        )
    if args.num_shards == 1:  # no other job writes into the output folder: nothing of another's is on its way
        args.bucket_lag = 0.0
    args.prompts = [" ".join(prompt.split()) for prompt in args.prompts]
    if not all(args.prompts):
        parser.error("--prompts must not contain empty text")
    if len(set(args.prompts)) != len(args.prompts):
        parser.error(f"--prompts has duplicates: {args.prompts}")
    return args
