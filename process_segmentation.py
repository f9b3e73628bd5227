"""Track every object that matches a few text prompts through videos with SAM3.

Each video has a key: its path inside the folder it was found in, without the extension
("train/10001/en"), or the file name without the extension for a video given as a file. For each
video this writes, under OUTPUT_DIR/<key>/, with <name> the key's last part ("en"):
  <name>_segmented.mp4   H.264 (yuv420p, faststart) with each object's mask, box, ID and prompt drawn
  <name>_tracks.jsonl    per frame: each object's ID, prompt, score, box and COCO RLE mask
  <name>_mot.txt         the boxes in MOTChallenge format
  <name>_preview.jpg     a contact sheet of six overlay frames
  <name>_metadata.json   what was processed and found; written last, so its presence means "complete"
  <name>_error.json      only when the video failed: one line saying why

Usage:
  python process_segmentation.py match.mp4
  python process_segmentation.py videos/ other.mov --prompts "soccer player" ball --sample-fps 2
  python process_segmentation.py /data/videos --shard-index 3 --num-shards 10   # this job's share
  python process_segmentation.py --summarize OUTPUT_DIR [videos/]               # done / partial / failed / missing

Frames are decoded, tracked, drawn and encoded one at a time, and the model is loaded once per run.
Exit status: 0 when every video is complete, 1 when any video failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import hashlib
import io
import itertools
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import torch
from pycocotools import mask as coco_mask
from tqdm import tqdm

DEFAULT_MODEL = "facebook/sam3"
DEFAULT_PROMPTS = ("soccer player", "ball")
DEFAULT_SAMPLE_FPS = 1.0
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts"})
MAX_PROMPT_TOKENS = 32  # SAM3's text encoder pads every prompt to exactly this many tokens
ENCODER_OPTIONS = {"crf": "23", "preset": "veryfast"}
MASK_ALPHA = 0.5
# Frames per SAM3 session. Memory grows linearly within a session: measured at full size in
# bfloat16, 74 MB per frame with 20 objects (10.0 GB peak at 100 frames, 17.4 GB at 200), and 100
# was the fastest of 50/100/200 (README, "The full-size SAM3, measured").
DEFAULT_CHUNK_FRAMES = 100
IDENTITY_TRANSFORM = (1, 0, 0, 1)  # display matrix signs (a, b, c, d) of an upright frame
MATCH_IOU = 0.3  # least mask IoU, on the frame two windows share, to keep an object's ID
PREVIEW_GRID = (3, 2)  # columns, rows of the contact sheet
PREVIEW_TILE_WIDTH = 480
PREVIEW_JPEG_QUALITY = 85
# tab20-like, reordered so that consecutive IDs get contrasting colours. RGB.
PALETTE = np.array(
    [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (188, 189, 34),
        (23, 190, 207),
        (255, 187, 120),
        (174, 199, 232),
        (152, 223, 138),
        (255, 152, 150),
        (197, 176, 213),
        (196, 156, 148),
        (247, 182, 210),
        (219, 219, 141),
        (158, 218, 229),
        (127, 127, 127),
        (255, 255, 255),
    ],
    dtype=np.uint8,
)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# The oldest NVIDIA driver each CUDA major version of PyTorch runs on (CUDA 12 through
# minor-version compatibility).
MIN_DRIVER_FOR_CUDA = {13: 580, 12: 525, 11: 450}
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A problem with the command line or environment that stops the whole run (exit 2)."""


class VideoError(Exception):
    """A problem with one input video that a user can fix; it fails that video only."""


@dataclasses.dataclass(frozen=True)
class Video:
    """One input video and the key that names its results."""

    path: Path
    key: str  # "/"-separated path inside the folder it was found in, without extension: "train/10001/en"
    size: int | None  # bytes when listed; None when it is not a file (it then fails with its own record)


@dataclasses.dataclass(frozen=True)
class SampledFrame:
    """One decoded frame chosen by the sampler."""

    source_index: int  # index of the frame in decode order
    timestamp: float  # seconds since the first frame
    rgb: np.ndarray  # (H, W, 3) uint8 RGB


@dataclasses.dataclass(frozen=True)
class Detections:
    """SAM3's objects on one frame, on the CPU, each mask cropped to its box."""

    object_ids: np.ndarray  # (N,) int64, stable across the frames of one video
    prompts: list[str]  # N prompt texts
    scores: np.ndarray  # (N,) float32 detection scores
    boxes: np.ndarray  # (N, 4) int64 XYXY pixels, inclusive: the tight box of each mask
    masks: list[np.ndarray]  # N arrays (y1 - y0 + 1, x1 - x0 + 1) bool: the mask inside its box

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros(0, np.int64), [], np.zeros(0, np.float32), np.zeros((0, 4), np.int64), [])

    def full_mask(self, index: int, size: tuple[int, int]) -> np.ndarray:
        """Object `index`'s mask as a (H, W) bool array of the frame's `size`."""
        mask = np.zeros(size, dtype=bool)
        x0, y0, x1, y1 = self.boxes[index]
        mask[y0 : y1 + 1, x0 : x1 + 1] = self.masks[index]
        return mask


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video before decoding it."""

    width: int
    height: int
    fps: Fraction  # average frame rate
    duration: float | None  # seconds, None when the container does not say


@dataclasses.dataclass(frozen=True)
class Segmenter:
    """The model and everything needed to run it, built once per process."""

    model: Any  # transformers.Sam3VideoModel
    processor: Any  # transformers.Sam3VideoProcessor
    model_name: str
    device: torch.device
    dtype: torch.dtype
    postprocessing: str  # whose NMS and hole filling SAM3 runs with: "kernels" or "local"


@dataclasses.dataclass
class ObjectTrack:
    """Running summary of one object ID across a video."""

    object_id: int
    prompt: str
    first_frame: int
    last_frame: int
    first_time: float
    last_time: float
    frames_present: int = 0
    max_score: float = 0.0
    score_sum: float = 0.0


def log(message: str) -> None:
    """Print a log line without breaking the progress bars."""
    tqdm.write(message, file=sys.stderr)


def redact(text: str) -> str:
    """Remove the Hugging Face token from a message that may end up on screen or on disk."""
    token = os.environ.get("HF_TOKEN")
    return text.replace(token, "***") if token else text


def one_line(error: BaseException) -> str:
    """An exception as a single line: the message, or the type name when there is none.

    FFmpeg errors carry errno and file name in their text; their plain reason reads better.
    """
    reason = error.strerror if isinstance(error, av.FFmpegError) and error.strerror else str(error)
    return redact(" ".join(reason.split()) or type(error).__name__)


# ---------------------------------------------------------------------------------------------
# Arguments and videos
# ---------------------------------------------------------------------------------------------


def default_output_dir() -> Path:
    """Under /outputs when it exists (the bucket mounted by the SkyPilot YAMLs), else here."""
    outputs = Path("/outputs")
    return outputs / "segmentation_results" if outputs.is_dir() else Path("segmentation_results")


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
        type=float,
        default=DEFAULT_SAMPLE_FPS,
        help="frames per second of video to process; 0 = every frame",
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
        help="sampled frames per SAM3 session; bounds memory on long videos",
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
        "--check-device",
        action="store_true",
        help="process nothing; print the device and precision a run would use, or why it cannot (exit 2)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="redo videos whose results are already complete"
    )
    parser.add_argument(
        "--no-tracks",
        dest="tracks",
        action="store_false",
        help="skip the per-frame tracks (JSONL with COCO RLE masks, MOT text)",
    )
    parser.add_argument(
        "--shard-index", type=int, default=0, help="which share of the videos this process takes (0-based)"
    )
    parser.add_argument("--num-shards", type=int, default=1, help="how many shares the videos are split into")
    parser.add_argument(
        "--summarize",
        type=Path,
        metavar="DIR",
        help="process nothing; write DIR/summary.json and DIR/summary.csv (done / partial / failed / missing per video). "
        "INPUTs, if given, are the videos expected in DIR",
    )
    args = parser.parse_args(argv)
    if not args.inputs and args.summarize is None and not args.check_device:
        parser.error("the following arguments are required: inputs (or --summarize DIR, or --check-device)")
    if args.max_frames < 0:
        parser.error(f"--max-frames must be 0 or more, got {args.max_frames}")
    if args.chunk_frames < 2:
        parser.error(f"--chunk-frames must be 2 or more (windows share one frame), got {args.chunk_frames}")
    if not math.isfinite(args.sample_fps):
        parser.error(f"--sample-fps must be a number, got {args.sample_fps}")
    if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        parser.error(
            f"--shard-index must be in [0, --num-shards), got {args.shard_index} of {args.num_shards}"
        )
    args.prompts = [" ".join(prompt.split()) for prompt in args.prompts]
    if not all(args.prompts):
        parser.error("--prompts must not contain empty text")
    if len(set(args.prompts)) != len(args.prompts):
        parser.error(f"--prompts has duplicates: {args.prompts}")
    return args


def is_hidden(name: str) -> bool:
    """Dot files and folders, and the __MACOSX folder of zips made on a Mac (its `._x.mp4` files
    are resource forks, not videos)."""
    return name.startswith(".") or name == "__MACOSX"


def file_size(path: Path) -> int | None:
    """The size of a regular file (following symlinks), or None when `path` is not one."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_size if stat.S_ISREG(status.st_mode) else None


def find_videos(folder: Path, output_dir: Path) -> list[Video]:
    """The videos below `folder`, sorted by path, keyed by their path inside it.

    Results are never inputs: `output_dir` is not searched where it lies below `folder`, and where
    `folder` is `output_dir` or lies in it, the result videos there (`<name>/<name>_segmented.mp4`)
    are left out. So are hidden files and folders. Symlinked folders are not followed (as
    `Path.rglob`); symlinked files are.
    """
    # Compared resolved (symlinks, `..`); the folders walked are real ones, so `root / inside` is theirs.
    root, results = folder.resolve(), output_dir.resolve()
    in_output = results == root or results in root.parents
    skip = results.relative_to(root) if root in results.parents else None
    videos = []
    for parent, folders, files in os.walk(folder):
        here, inside = Path(parent), Path(os.path.relpath(parent, folder))
        folders[:] = [name for name in folders if not is_hidden(name) and inside / name != skip]
        result = output_paths(here.parent, here.name)["video"].name if in_output else None
        for name in files:
            path = here / name
            if is_hidden(name) or name == result or path.suffix.lower() not in VIDEO_EXTENSIONS:
                continue
            size = file_size(path)
            if size is not None:
                videos.append(Video(path, (inside / name).with_suffix("").as_posix(), size))
    return sorted(videos, key=lambda video: video.path)


def collect_videos(inputs: Sequence[Path], output_dir: Path) -> list[Video]:
    """Files as given (keyed by name without extension), folders expanded to their videos
    (`find_videos`: never results in `output_dir`), each video once.

    A hidden file given as such is ignored. A path that does not exist is kept, so that it fails as
    a video with its own error record.
    """
    videos: dict[str, Video] = {}  # by absolute path, the first key found for it
    for path in inputs:
        if path.is_dir():
            found = find_videos(path, output_dir)
            if not found:
                raise UsageError(f"{path}: folder has no video files ({', '.join(sorted(VIDEO_EXTENSIONS))})")
        elif is_hidden(path.name) or "__MACOSX" in path.parts:
            log(f"ignore {path}: a hidden file (such as macOS's ._ files), not a video")
            continue
        else:
            found = [Video(path, path.stem, file_size(path))]
        for video in found:
            videos.setdefault(os.path.abspath(video.path), video)
    keys: dict[str, Video] = {}
    for video in videos.values():
        if video.key in keys:
            raise UsageError(
                f"{video.path} and {keys[video.key].path} would both write to <output-dir>/{video.key}/: "
                "give the folder that holds both (their keys then include their own folders), "
                "or give each its own --output-dir"
            )
        keys[video.key] = video
    return list(videos.values())


def select_shard(videos: Sequence[Video], shard_index: int, num_shards: int) -> list[Video]:
    """This shard's videos, in their order: largest file first to the least-loaded shard.

    Weighed by file size as listed, which every job reads the same way; a duration needs each file
    opened, and a read that fails on one worker only would give that job different shares. A file
    that is missing weighs nothing. Deterministic (ties go by key), so a recovered job with the same
    index picks the same videos; every video lands in exactly one shard, and no shard exceeds the
    ideal load by more than one video.
    """
    if num_shards == 1:
        return list(videos)
    loads = [0] * num_shards
    mine: set[str] = set()
    for video in sorted(videos, key=lambda video: (-(video.size or 0), video.key)):
        shard = min(range(num_shards), key=lambda index: (loads[index], index))
        loads[shard] += video.size or 0
        if shard == shard_index:
            mine.add(video.key)
    return [video for video in videos if video.key in mine]


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def nvidia_driver_version() -> str | None:
    """The NVIDIA driver version nvidia-smi reports, or None where there is no working nvidia-smi."""
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.split()
    return lines[0] if result.returncode == 0 and lines else None


def cuda_unavailable_reason() -> str:
    """One line on why PyTorch cannot use a GPU here, naming the driver and the CUDA build."""
    build = f"PyTorch {torch.__version__}"
    if torch.version.cuda is None:
        return f"{build} is a CPU-only build: install a CUDA build (README, \"GPU drivers\")"
    needed = MIN_DRIVER_FOR_CUDA.get(int(torch.version.cuda.split(".")[0]))
    build += f" (CUDA {torch.version.cuda}" + (f", needs NVIDIA driver >= {needed})" if needed else ")")
    driver = nvidia_driver_version()
    if driver is None:
        return f"{build} cannot see a CUDA GPU: no NVIDIA driver answers (nvidia-smi missing or failing)"
    if needed and int(driver.split(".")[0]) < needed:
        return (
            f"{build} cannot use the GPU: NVIDIA driver {driver} is too old; install the PyTorch build "
            f"for this driver (README, \"GPU drivers\") or use an image with a newer driver"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    return f"{build} cannot see a CUDA GPU although NVIDIA driver {driver} is installed{hint}"


def choose_device(requested: str) -> torch.device:
    """CUDA when asked (or, for "auto", when there is one); "cuda" without a usable GPU is an error."""
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "cuda":
        raise UsageError(f"--device cuda: {cuda_unavailable_reason()}")
    log("warning: no CUDA GPU: running SAM3 on the CPU, about 100x slower (--device cuda makes this an error)")
    return torch.device("cpu")


def choose_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The model's dtype; "auto" is bfloat16 on GPUs that support it, float32 elsewhere."""
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def describe_device(device: torch.device, dtype: torch.dtype) -> str:
    """One line: the device, and for a GPU its name, memory, driver and PyTorch's CUDA version."""
    name = dtype_name(dtype)
    if device.type != "cuda":
        return f"cpu: PyTorch {torch.__version__}, {name}"
    gpu = torch.cuda.get_device_properties(device)
    return (
        f"cuda: {gpu.name} ({gpu.total_memory / 2**30:.0f} GiB), NVIDIA driver {nvidia_driver_version() or '?'}, "
        f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}), {name}"
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class LocalCvUtils:
    """SAM3's post-processing operations, computed locally with OpenCV.

    transformers' SAM3 video model runs detection NMS, hole filling and sprinkle removal through
    the `kernels-community/cv-utils` kernels, and silently skips all three where they do not load
    (no `kernels` package, no Hub access, no build for this torch/CUDA). This object offers the
    same two operations, so those steps always run.
    """

    @staticmethod
    def generic_nms(
        ious: torch.Tensor, scores: torch.Tensor, iou_threshold: float, use_iou_matrix: bool = True
    ) -> torch.Tensor:
        """Greedy NMS over an (N, N) IoU matrix: keep the best-scoring detection, drop all whose
        IoU with it exceeds `iou_threshold`, repeat. Returns the kept indices, (K,) int64."""
        if not use_iou_matrix:
            raise ValueError("only NMS over a precomputed IoU matrix is implemented")
        overlaps = (ious.float() > iou_threshold).cpu().numpy()
        suppressed = np.zeros(len(overlaps), dtype=bool)
        kept = []
        for index in np.argsort(-scores.float().cpu().numpy(), kind="stable"):
            if not suppressed[index]:
                kept.append(index)
                suppressed |= overlaps[index]
        return torch.tensor(kept, dtype=torch.int64, device=scores.device)

    @staticmethod
    def cc_2d(masks: torch.Tensor, get_counts: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """8-connected components of (B, 1, H, W) uint8 masks.

        Returns labels, (B, 1, H, W) int32 (0 off the mask, components numbered from 1), and
        counts, (B, 1, H, W) int32: the area of each pixel's component (0 off the mask).
        """
        array = masks.cpu().numpy()
        labels = np.zeros(array.shape, dtype=np.int32)
        counts = np.zeros(array.shape, dtype=np.int32)
        for index, mask in enumerate(array[:, 0]):
            _, labels[index, 0], stats, _ = cv2.connectedComponentsWithStats(
                mask, connectivity=8, ltype=cv2.CV_32S
            )
            areas = stats[:, cv2.CC_STAT_AREA].astype(np.int32)
            areas[0] = 0
            counts[index, 0] = areas[labels[index, 0]]
        return torch.from_numpy(labels).to(masks.device), torch.from_numpy(counts).to(masks.device)


def enable_sam3_postprocessing() -> str:
    """Make transformers run SAM3's detection NMS, hole filling and sprinkle removal.

    The `kernels` package's implementation where it loads, else `LocalCvUtils`. Returns which.
    """
    from transformers.models.sam3_video import modeling_sam3_video as sam3
    from transformers.utils import is_kernels_available
    from transformers.utils import logging as hf_logging

    if sam3.cv_utils_kernel is None and is_kernels_available():
        logger = hf_logging.get_logger(sam3.__name__)
        level = logger.level
        logger.setLevel(hf_logging.ERROR)  # its "will be skipped" warning would not be true here
        try:
            sam3._load_cv_utils_kernel_once()
        finally:
            logger.setLevel(level)
    if not sam3.cv_utils_kernel:
        sam3.cv_utils_kernel = LocalCvUtils()
    return "local" if isinstance(sam3.cv_utils_kernel, LocalCvUtils) else "kernels"


def load_segmenter(model_name: str, device: torch.device, dtype: torch.dtype) -> Segmenter:
    """Load SAM3 once. A local directory loads offline; a hub ID uses HF_TOKEN for the gated checkpoint."""
    from transformers import Sam3VideoModel, Sam3VideoProcessor

    looks_like_path = model_name.startswith((os.sep, ".", "~")) or model_name.count("/") > 1
    if looks_like_path:
        if not Path(model_name).expanduser().is_dir():
            raise UsageError(f"cannot load model {model_name}: no such directory")
        model_name = str(Path(model_name).expanduser())
    token = os.environ.get("HF_TOKEN") or None
    try:
        processor = Sam3VideoProcessor.from_pretrained(model_name, token=token)
        model = Sam3VideoModel.from_pretrained(model_name, token=token, dtype=dtype)
    except (OSError, ValueError) as error:
        hint = "" if Path(model_name).is_dir() else " (is HF_TOKEN set, with access to the gated checkpoint?)"
        raise UsageError(f"cannot load model {model_name}: {one_line(error)}{hint}") from None
    postprocessing = enable_sam3_postprocessing()
    return Segmenter(model.to(device).eval(), processor, model_name, device, dtype, postprocessing)


def check_prompts(processor: Any, prompts: Sequence[str]) -> None:
    """Reject prompts the text encoder cannot take, before any video is touched."""
    for prompt in prompts:
        tokens = len(processor.tokenizer(prompt).input_ids)
        if tokens > MAX_PROMPT_TOKENS:
            raise UsageError(
                f'prompt "{prompt}" is {tokens} tokens; SAM3\'s text encoder takes at most {MAX_PROMPT_TOKENS}: shorten it'
            )


# ---------------------------------------------------------------------------------------------
# Frames in
# ---------------------------------------------------------------------------------------------


def read_video_info(container: av.container.InputContainer, path: Path) -> VideoInfo:
    if not container.streams.video:
        raise VideoError(f"{path}: no video stream")
    stream = container.streams.video[0]
    fps = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not fps or not stream.width or not stream.height:
        raise VideoError(f"{path}: video stream has no frame rate or size")
    duration = container.duration / av.time_base if container.duration else None
    return VideoInfo(width=stream.width, height=stream.height, fps=Fraction(fps), duration=duration)


def output_rate(sample_fps: float, source_fps: Fraction) -> Fraction:
    """Frame rate of the output MP4: the sample rate, or the source rate when sampling every frame."""
    if sample_fps <= 0:
        return source_fps
    return min(Fraction(sample_fps).limit_denominator(1001), source_fps)


def display_transform(frame: av.VideoFrame) -> tuple[int, int, int, int]:
    """The 2x2 part of the frame's display matrix as signs (a, b, c, d), identity when absent.

    FFmpeg maps a stored pixel (x, y) to the displayed pixel (a x + c y, b x + d y) (then shifted
    into view), so a signed permutation covers rotations by 90/180/270 degrees and mirroring.
    A matrix that is not one (an odd angle) is ignored, as most players do.
    """
    side_data = frame.side_data.get(av.sidedata.sidedata.Type.DISPLAYMATRIX)
    if side_data is None:
        return IDENTITY_TRANSFORM
    matrix = np.frombuffer(bytes(side_data), dtype="<i4")
    a, b, _, c, d = (matrix[:5] / max(np.abs(matrix[[0, 1, 3, 4]]).max(), 1)).round().astype(int)
    signs = (int(a), int(b), int(c), int(d))
    permutation = sorted(map(abs, signs)) == [0, 0, 1, 1] and abs(a * d - b * c) == 1
    return signs if permutation else IDENTITY_TRANSFORM


def to_display(rgb: np.ndarray, transform: tuple[int, int, int, int]) -> np.ndarray:
    """A stored frame as a player shows it. rgb: (H, W, 3) uint8; returns (H', W', 3) uint8,
    H' x W' swapped for quarter turns."""
    a, b, c, d = transform
    if b == 0:  # x stays x (mirrored when a < 0), y stays y (mirrored when d < 0)
        shown = rgb[::d, ::a]
    else:  # x and y swap: displayed row = b * stored x, displayed column = c * stored y
        shown = rgb.transpose(1, 0, 2)[::b, ::c]
    return shown if shown is rgb else np.ascontiguousarray(shown)


def display_rotation(transform: tuple[int, int, int, int]) -> tuple[int, bool]:
    """(degrees counter-clockwise, mirrored) of a display transform, as players report it."""
    a, b, c, d = transform
    mirrored = a * d - b * c < 0
    if mirrored:  # undo a horizontal mirror first, then read the rotation
        a, c = -a, -c
    return round(math.degrees(math.atan2(-b, a))) % 360, mirrored


@dataclasses.dataclass
class DecodeReport:
    """What decoding found out on the way through a video."""

    transform: tuple[int, int, int, int] = IDENTITY_TRANSFORM  # display matrix of the first sampled frame
    error: str | None = None  # why decoding stopped before the end of the video, if it did


def sample_frames(
    container: av.container.InputContainer,
    sample_fps: float,
    max_frames: int,
    report: DecodeReport | None = None,
) -> Iterator[SampledFrame]:
    """Decode the first video stream and yield one frame per 1/sample_fps seconds of video time,
    upright as a player shows it.

    Sample k is the first frame at or after k / sample_fps seconds (exact fractions, so 29.97 fps
    and variable-frame-rate videos do not drift). Only chosen frames are converted to RGB.
    A decode error after the first sample ends the video early (a file cut short keeps what
    decoded) and is recorded in `report`; before it, the error is raised.
    """
    report = report if report is not None else DecodeReport()
    stream = container.streams.video[0]
    interval = Fraction(1) / Fraction(sample_fps).limit_denominator(1001) if sample_fps > 0 else Fraction(0)
    fallback_rate = Fraction(stream.average_rate or 25)
    origin: Fraction | None = None
    next_time = Fraction(0)
    sampled = 0
    decoded = enumerate(container.decode(stream))
    while True:
        try:
            index, frame = next(decoded)
        except StopIteration:
            return
        except av.FFmpegError as error:
            if not sampled:
                raise
            report.error = one_line(error)
            return
        if frame.pts is not None and stream.time_base is not None:
            when = frame.pts * Fraction(stream.time_base)
        else:
            when = index / fallback_rate
        origin = when if origin is None else origin
        elapsed = when - origin
        if elapsed < next_time:
            continue
        if not sampled:
            report.transform = display_transform(frame)
        rgb = to_display(frame.to_ndarray(format="rgb24"), report.transform)
        yield SampledFrame(source_index=index, timestamp=float(elapsed), rgb=rgb)
        sampled += 1
        if max_frames and sampled >= max_frames:
            return
        if interval:  # next grid point after this frame; a long gap is not made up with repeats
            next_time = (elapsed // interval + 1) * interval
        else:
            next_time = elapsed + Fraction(1, 10**9)


# ---------------------------------------------------------------------------------------------
# SAM3
# ---------------------------------------------------------------------------------------------


def output_span(low: int, high: int, in_size: int, out_size: int) -> tuple[int, int]:
    """The output pixels of a bilinear upsample that can depend on source pixels [low, high).

    The outermost source pixels also feed the clamped outputs out to the image border.
    """
    scale = out_size / in_size
    start = 0 if low == 0 else max(math.floor((low + 0.5) * scale - 0.5), 0)
    stop = out_size if high == in_size else min(math.ceil((high - 0.5) * scale + 0.5), out_size)
    return start, stop


def upsample_region(
    logits: np.ndarray, size: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]
) -> np.ndarray:
    """Bilinear upsample of (h, w) float32 logits to `size` (H, W), computed only for output
    rows [rows) and columns [cols): the same values as that region of torch's
    `interpolate(mode="bilinear", align_corners=False)` over the whole frame (to ~1e-4)."""
    (height, width), (h, w) = size, logits.shape
    scale_y, scale_x = h / height, w / width
    # output pixel (x, y) of the region samples source ((x + x0 + 0.5) * scale - 0.5, ...), clamped
    to_source = np.array(
        [[scale_x, 0.0, (cols[0] + 0.5) * scale_x - 0.5], [0.0, scale_y, (rows[0] + 0.5) * scale_y - 0.5]]
    )
    return cv2.warpAffine(
        logits,
        to_source,
        (cols[1] - cols[0], rows[1] - rows[0]),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )


def masks_from_logits(
    logits: np.ndarray, priorities: Sequence[float], groups: Sequence[int], size: tuple[int, int]
) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Full-resolution masks from SAM3's low-resolution mask logits, each cropped to its box.

    logits: (N, h, w) float32. Returns per object (box (4,) int64 XYXY inclusive, (bh, bw) bool
    crop), or None when its mask is empty.
    Same masks as `Sam3VideoProcessor.postprocess_outputs` (upsample, threshold at 0, then within
    a prompt group each pixel goes to the object with the highest priority, ties to the earlier
    object), but every step runs only inside each object's box: that processor upsamples and
    compares every object over the whole frame, which dominated the time per frame on CPU.
    """
    height, width = size
    count, h, w = logits.shape
    crops: list[tuple[int, int, np.ndarray] | None] = [None] * count
    for i in range(count):
        positive = logits[i] > 0
        rows, cols = np.flatnonzero(positive.any(axis=1)), np.flatnonzero(positive.any(axis=0))
        if rows.size == 0:
            continue
        # A margin of one source pixel covers the outputs that interpolate towards the mask.
        y0, y1 = output_span(max(rows[0] - 1, 0), min(rows[-1] + 2, h), h, height)
        x0, x1 = output_span(max(cols[0] - 1, 0), min(cols[-1] + 2, w), w, width)
        crops[i] = (y0, x0, upsample_region(logits[i], size, (y0, y1), (x0, x1)) > 0)

    claimed: dict[int, np.ndarray] = {}  # per prompt group: (H, W) bool, pixels already taken
    results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * count
    for i in sorted(range(count), key=lambda k: (-priorities[k], k)):
        if crops[i] is None:
            continue
        y0, x0, crop = crops[i]
        taken = claimed.setdefault(groups[i], np.zeros(size, dtype=bool))[
            y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]
        ]
        np.greater(crop, taken, out=crop)  # crop and not taken
        taken |= crop
        left, top, box_w, box_h = cv2.boundingRect(crop.view(np.uint8))
        if box_w:
            box = np.array([x0 + left, y0 + top, x0 + left + box_w - 1, y0 + top + box_h - 1], dtype=np.int64)
            results[i] = (box, crop[top : top + box_h, left : left + box_w])
    return results


def detections_from_output(output: Any, session: Any, size: tuple[int, int]) -> Detections:
    """One frame of `Sam3VideoModel` output -> the objects to draw, hidden objects left out."""
    hidden = set(output.suppressed_obj_ids or ()) | set(session.hotstart_removed_obj_ids)
    object_ids = [obj_id for obj_id in sorted(output.obj_id_to_mask) if obj_id not in hidden]
    if not object_ids:
        return Detections.empty()
    logits = torch.cat([output.obj_id_to_mask[obj_id] for obj_id in object_ids]).float().cpu().numpy()
    masks = masks_from_logits(
        logits,
        priorities=[output.obj_id_to_tracker_score.get(obj_id, 0.0) for obj_id in object_ids],
        groups=[session.obj_id_to_prompt_id[obj_id] for obj_id in object_ids],
        size=size,
    )
    kept = [(obj_id, mask) for obj_id, mask in zip(object_ids, masks, strict=True) if mask is not None]
    return Detections(
        object_ids=np.array([obj_id for obj_id, _ in kept], dtype=np.int64),
        prompts=[session.prompts[session.obj_id_to_prompt_id[obj_id]] for obj_id, _ in kept],
        scores=np.array([float(output.obj_id_to_score[obj_id]) for obj_id, _ in kept], dtype=np.float32),
        boxes=np.array([box for _, (box, _) in kept], dtype=np.int64).reshape(-1, 4),
        masks=[crop for _, (_, crop) in kept],
    )


def track_window(
    segmenter: Segmenter, frames: Iterable[SampledFrame], prompts: Sequence[str], size: tuple[int, int]
) -> Iterator[tuple[SampledFrame, Detections]]:
    """Run SAM3 over streamed frames in one fresh session, all prompts at once; yield each
    frame's objects with this session's IDs.

    This is `propagate_in_video_iterator` fed frame by frame: the session is not handed the
    frames up front, so they are not all decoded at once. Like that iterator, outputs are held
    back `hotstart_delay` frames so that SAM3 can drop spurious objects before they are drawn.
    """
    model, processor = segmenter.model, segmenter.processor
    session = processor.init_video_session(inference_device=segmenter.device, dtype=segmenter.dtype)
    processor.add_text_prompt(session, list(prompts))
    pending: deque[tuple[SampledFrame, Any]] = deque()
    delay = max(int(model.hotstart_delay), 1)
    with torch.inference_mode():
        for frame_idx, sample in enumerate(frames):
            pixels = processor.video_processor(
                videos=[sample.rgb], device=segmenter.device, return_tensors="pt"
            )
            session.add_new_frame(pixels.pixel_values_videos[0], frame_idx=frame_idx)
            output = model(inference_session=session, frame_idx=frame_idx)
            session.hotstart_removed_obj_ids.update(output.removed_obj_ids)
            pending.append((sample, output))
            if len(pending) >= delay:
                sample, output = pending.popleft()
                yield sample, detections_from_output(output, session, size)
        while pending:
            sample, output = pending.popleft()
            yield sample, detections_from_output(output, session, size)


def mask_iou(box_a: np.ndarray, mask_a: np.ndarray, box_b: np.ndarray, mask_b: np.ndarray) -> float:
    """IoU of two box-cropped masks (boxes XYXY inclusive)."""
    x0, y0 = max(box_a[0], box_b[0]), max(box_a[1], box_b[1])
    x1, y1 = min(box_a[2], box_b[2]), min(box_a[3], box_b[3])
    if x1 < x0 or y1 < y0:
        return 0.0
    a = mask_a[y0 - box_a[1] : y1 - box_a[1] + 1, x0 - box_a[0] : x1 - box_a[0] + 1]
    b = mask_b[y0 - box_b[1] : y1 - box_b[1] + 1, x0 - box_b[0] : x1 - box_b[0] + 1]
    intersection = int(np.count_nonzero(a & b))
    union = int(np.count_nonzero(mask_a)) + int(np.count_nonzero(mask_b)) - intersection
    return intersection / union if union else 0.0


def match_objects(previous: Detections, current: Detections) -> dict[int, int]:
    """Pair objects seen on the same frame by two sessions: {current ID: previous ID}.

    Greedy on mask IoU (best pairs first), same prompt only, IoU at least MATCH_IOU.
    """
    pairs = [
        (mask_iou(previous.boxes[i], previous.masks[i], current.boxes[j], current.masks[j]), i, j)
        for i in range(len(previous.object_ids))
        for j in range(len(current.object_ids))
        if previous.prompts[i] == current.prompts[j]
    ]
    matches: dict[int, int] = {}
    used: set[int] = set()
    for iou, i, j in sorted(pairs, key=lambda pair: -pair[0]):
        if iou < MATCH_IOU or i in used or int(current.object_ids[j]) in matches:
            continue
        used.add(i)
        matches[int(current.object_ids[j])] = int(previous.object_ids[i])
    return matches


def track_objects(
    segmenter: Segmenter,
    frames: Iterable[SampledFrame],
    prompts: Sequence[str],
    size: tuple[int, int],
    chunk_frames: int,
    windows: list[int] | None = None,
) -> Iterator[tuple[SampledFrame, Detections]]:
    """Track through a video of any length in windows of at most `chunk_frames` frames.

    SAM3's session keeps every frame and per-object memory for every frame, so memory would grow
    with the video. Each window is a fresh session; consecutive windows share one frame, on which
    objects are matched by mask, so an object keeps its ID (and colour) across windows. That
    shared frame is yielded once. `windows`, when given, receives each window's frame count.
    """
    frames = iter(frames)
    upcoming = next(frames, None)
    carried: tuple[SampledFrame, Detections] | None = None
    to_global: dict[int, int] = {}
    next_id = 1  # IDs start at 1, as MOTChallenge files expect
    while upcoming is not None:
        lead = [carried[0]] if carried else []
        window = itertools.islice(itertools.chain(lead, [upcoming], frames), chunk_frames)
        overlap_pending = bool(lead)
        count = 0
        for sample, local in track_window(segmenter, window, prompts, size):
            count += 1
            if overlap_pending:  # the frame the previous window already yielded: only match on it
                overlap_pending = False
                to_global = match_objects(carried[1], local)
                continue
            for obj_id in map(int, local.object_ids):
                if obj_id not in to_global:
                    to_global[obj_id], next_id = next_id, next_id + 1
            global_ids = np.array([to_global[int(obj_id)] for obj_id in local.object_ids], dtype=np.int64)
            carried = (sample, dataclasses.replace(local, object_ids=global_ids))
            yield carried
        if windows is not None:
            windows.append(count)
        upcoming = next(frames, None)


# ---------------------------------------------------------------------------------------------
# Overlay and records
# ---------------------------------------------------------------------------------------------


def object_color(object_id: int) -> tuple[int, int, int]:
    """The RGB colour of an object ID; the same ID always gets the same colour."""
    return tuple(int(c) for c in PALETTE[object_id % len(PALETTE)])


def draw_overlay(frame: np.ndarray, detections: Detections) -> np.ndarray:
    """Blend each mask in its object's colour and label it "ID prompt".

    frame: (H, W, 3) uint8 RGB. Returns a new (H, W, 3) uint8 RGB frame.
    Masks are painted largest first so that small objects (the ball) stay visible; each blend is
    done inside the object's box only, which is what keeps this cheap at 20+ objects.
    """
    height = frame.shape[0]
    canvas = frame.copy()
    areas = np.array([np.count_nonzero(mask) for mask in detections.masks])
    for i in np.argsort(-areas, kind="stable"):
        x0, y0, x1, y1 = detections.boxes[i]
        roi = canvas[y0 : y1 + 1, x0 : x1 + 1]
        tint = np.empty_like(roi)
        tint[:] = object_color(int(detections.object_ids[i]))
        blended = cv2.addWeighted(roi, 1.0 - MASK_ALPHA, tint, MASK_ALPHA, 0.0)
        cv2.copyTo(blended, detections.masks[i].view(np.uint8), roi)
    scale = max(height / 720.0, 0.4) * 0.6
    thickness = max(1, round(height / 360))
    for i, obj_id in enumerate(map(int, detections.object_ids)):
        color = object_color(obj_id)
        x0, y0, x1, y1 = map(int, detections.boxes[i])
        cv2.rectangle(canvas, (x0, y0), (x1, y1), color, thickness)
        label = f"{obj_id} {detections.prompts[i]}"
        (text_w, text_h), baseline = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        top = max(y0 - text_h - baseline - 2, 0)
        cv2.rectangle(canvas, (x0, top), (x0 + text_w + 2, top + text_h + baseline + 2), color, cv2.FILLED)
        cv2.putText(
            canvas,
            label,
            (x0 + 1, top + text_h + 1),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (0, 0, 0),
            thickness,
            cv2.LINE_AA,
        )
    return canvas


def update_tracks(
    tracks: dict[int, ObjectTrack], frame_number: int, timestamp: float, detections: Detections
) -> None:
    """Fold one frame's objects into the per-object summaries."""
    for obj_id, prompt, score in zip(
        detections.object_ids, detections.prompts, detections.scores, strict=True
    ):
        track = tracks.setdefault(
            int(obj_id), ObjectTrack(int(obj_id), prompt, frame_number, frame_number, timestamp, timestamp)
        )
        track.last_frame, track.last_time = frame_number, timestamp
        track.frames_present += 1
        track.max_score = max(track.max_score, float(score))
        track.score_sum += float(score)


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


class H264Writer:
    """Encode RGB frames to a browser-playable MP4 (H.264 High, yuv420p, moov atom first).

    Odd widths or heights lose their last column or row: yuv420p needs even sizes.
    """

    def __init__(self, path: Path, width: int, height: int, fps: Fraction) -> None:
        self.width, self.height = width - width % 2, height - height % 2
        self.container = av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"})
        self.stream = self.container.add_stream("libx264", rate=fps, options=dict(ENCODER_OPTIONS))
        self.stream.width, self.stream.height, self.stream.pix_fmt = self.width, self.height, "yuv420p"
        self.frames_written = 0

    def write(self, rgb: np.ndarray) -> None:
        """rgb: (H, W, 3) uint8 RGB, the size given at construction."""
        cropped = rgb[: self.height, : self.width]
        # cv2's RGB->I420 is ~10x faster than PyAV's own conversion.
        frame = av.VideoFrame.from_ndarray(cv2.cvtColor(cropped, cv2.COLOR_RGB2YUV_I420), format="yuv420p")
        frame.pts = self.frames_written
        self.container.mux(self.stream.encode(frame))
        self.frames_written += 1

    def close(self) -> None:
        self.container.mux(self.stream.encode(None))
        self.container.close()

    def __enter__(self) -> H264Writer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is None:
            self.close()
        else:  # nothing worth flushing: the file is discarded
            self.container.close()


def partial_path(path: Path) -> Path:
    """A hidden temporary name beside `path`, unique to this writer (pid and a random suffix)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(6).hex()}.partial")


def publish(local_file: Path, destination: Path) -> None:
    """Move a finished file into place so that readers never see it half-written.

    The destination may be a FUSE-mounted bucket: copy under a hidden temporary name first, then
    rename, which such mounts do support.
    """
    partial = partial_path(destination)
    try:
        shutil.move(local_file, partial)
        os.replace(partial, destination)
    finally:
        partial.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    """Replace `path` whole, even while other processes or threads write it too.

    Each writer uses its own temporary file in the same folder (`partial_path`), then renames it
    over `path`: readers see one complete version, the last rename wins.
    """
    partial = partial_path(path)
    try:
        partial.write_text(text)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")


def coco_rle(box: np.ndarray, crop: np.ndarray, size: tuple[int, int]) -> dict[str, Any]:
    """A box-cropped mask as COCO's compressed RLE of the full (H, W) frame.

    The same string `pycocotools.mask.encode` gives for the full mask, computed from the crop:
    COCO runs go down columns, so the columns left and right of the box are single zero runs.
    """
    height, width = size
    x0, y0, x1, y1 = map(int, box)
    columns = np.zeros((height, crop.shape[1]), dtype=np.uint8)
    columns[y0 : y1 + 1] = crop
    flat = columns.ravel(order="F")
    runs = np.diff(np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]]))
    if flat[0]:  # COCO runs start with zeros
        runs = np.concatenate([[0], runs])
    runs[0] += x0 * height
    trailing = (width - 1 - x1) * height
    if not flat[-1]:
        runs[-1] += trailing
    elif trailing:
        runs = np.concatenate([runs, [trailing]])
    encoded = coco_mask.frPyObjects({"size": [height, width], "counts": runs.tolist()}, height, width)
    return {"size": [height, width], "counts": encoded["counts"].decode("ascii")}


class TrackWriter:
    """Stream per-frame tracks to two local files: JSON lines with COCO RLE masks, and
    MOTChallenge rows (frame, id, bb_left, bb_top, bb_width, bb_height, conf, -1, -1, -1)."""

    def __init__(self, jsonl_path: Path, mot_path: Path, size: tuple[int, int]) -> None:
        self.size = size
        self.jsonl = jsonl_path.open("w")
        self.mot = mot_path.open("w")

    def write(self, frame_number: int, sample: SampledFrame, detections: Detections) -> None:
        objects = []
        for obj_id, prompt, score, box, crop in zip(
            detections.object_ids,
            detections.prompts,
            detections.scores,
            detections.boxes,
            detections.masks,
            strict=True,
        ):
            x0, y0, x1, y1 = map(int, box)
            objects.append(
                {
                    "id": int(obj_id),
                    "prompt": prompt,
                    "score": round(float(score), 4),
                    "box": [x0, y0, x1, y1],
                    "area": int(np.count_nonzero(crop)),
                    "mask": coco_rle(box, crop, self.size),
                }
            )
            self.mot.write(
                f"{frame_number + 1},{int(obj_id)},{x0},{y0},{x1 - x0 + 1},{y1 - y0 + 1},{float(score):.4f},-1,-1,-1\n"
            )
        record = {
            "frame": frame_number,
            "source_frame": sample.source_index,
            "timestamp": round(sample.timestamp, 6),
            "objects": objects,
        }
        self.jsonl.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self.jsonl.close()
        self.mot.close()

    def __enter__(self) -> TrackWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class PreviewSheet:
    """Evenly spaced thumbnails from a stream of frames of unknown length, as one contact sheet.

    Keeps every `stride`-th frame; when four times the tiles are kept, drops every other one and
    doubles the stride, so memory stays under 4 x tiles thumbnails and the chosen tiles are
    spaced evenly to within a quarter of their spacing.
    """

    def __init__(self, frame_size: tuple[int, int]) -> None:
        height, width = frame_size
        self.tile_size = (PREVIEW_TILE_WIDTH, max(2, round(PREVIEW_TILE_WIDTH * height / width / 2) * 2))
        self.tiles = PREVIEW_GRID[0] * PREVIEW_GRID[1]
        self.stride = 1
        self.kept: list[np.ndarray] = []

    def offer(self, frame_number: int, timestamp: float, frame: np.ndarray) -> None:
        """frame: (H, W, 3) uint8 RGB, already drawn on."""
        if frame_number % self.stride:
            return
        thumbnail = cv2.resize(frame, self.tile_size, interpolation=cv2.INTER_AREA)
        cv2.putText(
            thumbnail,
            f"{timestamp:.1f} s",
            (6, 20),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.55,
            (255, 255, 255),
            2,
            cv2.LINE_AA,
        )
        self.kept.append(thumbnail)
        if len(self.kept) >= 4 * self.tiles:
            self.kept, self.stride = self.kept[::2], self.stride * 2

    def render(self) -> np.ndarray:
        """(rows * tile_h, columns * tile_w, 3) uint8 RGB; unused tiles stay black."""
        columns, rows = PREVIEW_GRID
        tile_w, tile_h = self.tile_size
        sheet = np.zeros((rows * tile_h, columns * tile_w, 3), dtype=np.uint8)
        chosen = np.unique(
            np.linspace(0, len(self.kept) - 1, num=min(self.tiles, len(self.kept))).round().astype(int)
        )
        for slot, index in enumerate(chosen):
            row, column = divmod(slot, columns)
            sheet[row * tile_h : (row + 1) * tile_h, column * tile_w : (column + 1) * tile_w] = self.kept[
                index
            ]
        return sheet

    def save(self, path: Path) -> None:
        ok, jpeg = cv2.imencode(
            ".jpg",
            cv2.cvtColor(self.render(), cv2.COLOR_RGB2BGR),
            [cv2.IMWRITE_JPEG_QUALITY, PREVIEW_JPEG_QUALITY],
        )
        if not ok:
            raise RuntimeError("JPEG encoding of the preview failed")
        path.write_bytes(jpeg.tobytes())


def output_paths(output_dir: Path, key: str) -> dict[str, Path]:
    """Where the results of the video with `key` go: OUTPUT_DIR/train/10001/en/en_segmented.mp4, ..."""
    folder = output_dir / key
    name = folder.name
    return {
        "folder": folder,
        "video": folder / f"{name}_segmented.mp4",
        "tracks": folder / f"{name}_tracks.jsonl",
        "mot": folder / f"{name}_mot.txt",
        "preview": folder / f"{name}_preview.jpg",
        "metadata": folder / f"{name}_metadata.json",
        "error": folder / f"{name}_error.json",
    }


def read_record(path: Path) -> dict[str, Any]:
    """A JSON object this script wrote, or {} when it is absent or unreadable."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def file_record(path: Path) -> dict[str, Any]:
    """An output as the metadata lists it: its name, size and SHA-256 (to check a copy with)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def output_problems(folder: Path, metadata: dict[str, Any]) -> list[str]:
    """What is wrong with the outputs a video's metadata lists: [] when each file is in `folder`
    with its listed size.

    The metadata is written last, but a bucket mount uploads several files at once, so a worker
    lost at the wrong moment can leave the metadata without a file it lists, or with part of one.
    Sizes need only a stat, which is cheap even on a bucket mount; the checksums are for copies.
    """
    outputs = metadata.get("outputs")
    if not isinstance(outputs, dict) or "video" not in outputs:
        return ["the metadata lists no outputs"]
    problems = []
    for key, entry in outputs.items():
        listed = isinstance(entry, dict) and isinstance(entry.get("file"), str)
        if not (listed and isinstance(entry.get("bytes"), int)):
            problems.append(f"the metadata lists no size for its {key}")
            continue
        try:
            size = (folder / entry["file"]).stat().st_size
        except OSError:
            problems.append(f"{entry['file']} is missing")
            continue
        if size != entry["bytes"]:
            problems.append(f"{entry['file']} has {size} of its {entry['bytes']} bytes")
    return problems


def source_change(metadata: dict[str, Any], video: Video) -> str | None:
    """How the input now at a key differs from the one its results were made from, or None when
    it is the same or not known (metadata written before it recorded the source's size)."""
    name = metadata.get("source_name", metadata.get("video_name"))
    if isinstance(name, str) and name != video.path.name:
        return f"made from {name}, not {video.path.name}"
    size = metadata.get("source_bytes")
    if isinstance(size, int) and video.size is not None and size != video.size:
        return f"made from a file of {size} bytes, {video.path.name} has {video.size}"
    return None


def completed_metadata(paths: dict[str, Path]) -> dict[str, Any]:
    """The video's metadata if it says complete and every output it lists is whole, else {}."""
    metadata = read_record(paths["metadata"])
    complete = metadata.get("status") == "complete" and not output_problems(paths["folder"], metadata)
    return metadata if complete else {}


def check_output_dir(output_dir: Path) -> None:
    """Fail before loading the model when results could not be written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UsageError(f"{output_dir}: output folder is not writable: {one_line(error)}") from None


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# One video
# ---------------------------------------------------------------------------------------------


def process_video(
    video: Video, paths: dict[str, Path], segmenter: Segmenter, args: argparse.Namespace
) -> dict[str, Any]:
    """Segment one video: decode -> SAM3 -> overlay -> encode, frame by frame. Returns its metadata."""
    started = time.monotonic()
    source = video.path
    try:
        container = av.open(str(source))
    except (av.FFmpegError, OSError) as error:
        raise VideoError(f"{source}: not a readable video: {one_line(error)}") from None

    paths["folder"].mkdir(parents=True, exist_ok=True)
    products = ["video", "preview", *(["tracks", "mot"] if args.tracks else [])]
    # Stale results must not outlive a redo: "complete" metadata least of all.
    for key in ("metadata", *({"tracks", "mot"} - set(products))):
        paths[key].unlink(missing_ok=True)
    tracks: dict[int, ObjectTrack] = {}
    windows: list[int] = []
    timestamps: list[float] = []
    frame_indices: list[int] = []
    report = DecodeReport()
    with container, tempfile.TemporaryDirectory(prefix="sam3-") as scratch:
        info = read_video_info(container, source)
        fps_out = output_rate(args.sample_fps, info.fps)
        expected = math.ceil(info.duration * fps_out) if info.duration else None
        if args.max_frames and expected:
            expected = min(expected, args.max_frames)
        frames = sample_frames(container, args.sample_fps, args.max_frames, report)
        try:
            first = next(frames, None)
        except av.FFmpegError as error:
            raise VideoError(f"{source}: cannot decode: {one_line(error)}") from None
        if first is None:
            raise VideoError(f"{source}: no frames could be decoded")
        size = first.rgb.shape[:2]  # as displayed: (H, W) after the display matrix
        local = {key: Path(scratch) / paths[key].name for key in products}
        preview = PreviewSheet(size)
        with contextlib.ExitStack() as stack:
            writer = stack.enter_context(H264Writer(local["video"], size[1], size[0], fps_out))
            track_writer = (
                stack.enter_context(TrackWriter(local["tracks"], local["mot"], size)) if args.tracks else None
            )
            progress = stack.enter_context(
                tqdm(total=expected, unit="frame", desc=video.key, leave=False, dynamic_ncols=True)
            )
            for sample, detections in track_objects(
                segmenter, itertools.chain([first], frames), args.prompts, size, args.chunk_frames, windows
            ):
                frame_number = len(timestamps)
                drawn = draw_overlay(sample.rgb, detections)
                writer.write(drawn)
                preview.offer(frame_number, sample.timestamp, drawn)
                if track_writer:
                    track_writer.write(frame_number, sample, detections)
                update_tracks(tracks, frame_number, sample.timestamp, detections)
                timestamps.append(round(sample.timestamp, 6))
                frame_indices.append(sample.source_index)
                progress.update()
        preview.save(local["preview"])
        outputs = {key: file_record(local[key]) for key in products}
        for key in products:  # the metadata, written by the caller, comes last
            publish(local[key], paths[key])

    seconds = time.monotonic() - started
    rotation, mirrored = display_rotation(report.transform)
    objects = sorted(tracks.values(), key=lambda track: track.object_id)
    return {
        "status": "complete",
        "key": video.key,
        "video_name": source.name,
        "source_path": str(source),
        "source_name": source.name,
        "source_bytes": video.size,  # as listed, which is what the next run compares
        "width": size[1],
        "height": size[0],
        "stored_width": info.width,
        "stored_height": info.height,
        "rotation": rotation,
        "mirrored": mirrored,
        "duration_seconds": info.duration,
        "original_fps": float(info.fps),
        "sample_fps": args.sample_fps,
        "output_fps": float(fps_out),
        "max_frames": args.max_frames,
        "chunking": {
            "chunk_frames": args.chunk_frames,
            "windows": len(windows),
            "frames_per_window": windows,
        },
        "frames_processed": len(timestamps),
        "frames_expected": expected,
        "decode_error": report.error,
        "sampled_timestamps": timestamps,
        "sampled_frame_indices": frame_indices,
        "prompts": list(args.prompts),
        "objects_detected": len(objects),
        "objects_per_prompt": {prompt: sum(t.prompt == prompt for t in objects) for prompt in args.prompts},
        "objects": [
            {
                "id": track.object_id,
                "prompt": track.prompt,
                "first_frame": track.first_frame,
                "last_frame": track.last_frame,
                "first_timestamp": track.first_time,
                "last_timestamp": track.last_time,
                "frames_present": track.frames_present,
                "score": round(track.max_score, 4),
                "mean_score": round(track.score_sum / track.frames_present, 4),
            }
            for track in objects
        ],
        "model": segmenter.model_name,
        "device": str(segmenter.device),
        "dtype": dtype_name(segmenter.dtype),
        "postprocessing": segmenter.postprocessing,
        "processing_seconds": round(seconds, 3),
        "frames_per_second": round(len(timestamps) / seconds, 3) if seconds > 0 else None,
        "output_video": str(paths["video"]),
        "outputs": outputs,
        "output_codec": "h264",
        "completed_at": now_iso(),
    }


def record_failure(video: Video, paths: dict[str, Path], error: BaseException) -> str:
    """Write <name>_error.json and return the one line to show."""
    message = (
        one_line(error)
        if isinstance(error, VideoError)
        else f"{video.path}: {type(error).__name__}: {one_line(error)}"
    )
    record = {
        "status": "failed",
        "key": video.key,
        "video_name": video.path.name,
        "source_path": str(video.path),
        "error": message,
        "failed_at": now_iso(),
    }
    if not isinstance(error, VideoError):  # a bug or an environment problem: keep the details
        record["traceback"] = redact("".join(traceback.format_exception(error)))
    with contextlib.suppress(OSError):
        paths["folder"].mkdir(parents=True, exist_ok=True)
        write_json(paths["error"], record)
    return message


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def result_keys(output_dir: Path) -> set[str]:
    """The keys of the videos `output_dir` holds results or error records of: the folders below it,
    at any depth, that hold a file this script names after the folder (`en/en_metadata.json`).
    Other folders (logs, temporary files) are not videos."""
    keys = set()
    for parent, folders, files in os.walk(output_dir):
        folders[:] = [name for name in folders if not is_hidden(name)]
        key = Path(os.path.relpath(parent, output_dir)).as_posix()
        if key == ".":
            continue
        paths = output_paths(output_dir, key)
        if not set(files).isdisjoint(path.name for kind, path in paths.items() if kind != "folder"):
            keys.add(key)
    return keys


def summary_row(output_dir: Path, key: str) -> dict[str, Any]:
    """One video's entry in the summary, from what its folder under `output_dir` holds.

    done: complete metadata with every output it lists whole (`completed_metadata`);
    partial: the same, but decoding stopped before the end of the video (a file cut short);
    failed: an error record; missing: none of these (not started, in progress, interrupted,
    cut off while uploading, or no folder at all).
    """
    paths = output_paths(output_dir, key)
    metadata = completed_metadata(paths)
    failure = {} if metadata else read_record(paths["error"])
    if metadata:
        status = "partial" if metadata.get("decode_error") else "done"
    elif failure.get("status") == "failed":
        status = "failed"
    else:
        status = "missing"
    return {
        "video": key,
        "status": status,
        "frames_processed": metadata.get("frames_processed"),
        "objects_detected": metadata.get("objects_detected"),
        "objects_per_prompt": metadata.get("objects_per_prompt", {}),
        "processing_seconds": metadata.get("processing_seconds"),
        "decode_error": metadata.get("decode_error"),
        "error": failure.get("error") if status == "failed" else None,
    }


def summary_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as CSV text, one line per video.

    Columns: video, status, frames_processed, objects_detected, then `objects:<prompt>` for each
    prompt any video was run with (first seen first; empty where that video's run did not have
    it), then processing_seconds, decode_error, error. Empty cells where there is no value.
    """
    prompts = dict.fromkeys(prompt for row in rows for prompt in row["objects_per_prompt"])
    columns = ["video", "status", "frames_processed", "objects_detected"]
    columns += [f"objects:{prompt}" for prompt in prompts] + ["processing_seconds", "decode_error", "error"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {**row, **{f"objects:{prompt}": n for prompt, n in row["objects_per_prompt"].items()}}
        )
    return text.getvalue()


def print_summary(output_dir: Path, counts: dict[str, int], rows: Sequence[dict[str, Any]]) -> None:
    """A short table on stdout: videos per status, then each failed video with its error."""
    print(f"{len(rows)} videos in {output_dir} (summary.json, summary.csv)")
    for status, count in counts.items():
        print(f"  {status:<8} {count:>6}")
    for row in rows:
        if row["status"] == "failed":
            print(f"  failed: {row['video']}: {row['error']}")
        elif row["status"] == "partial":
            print(f"  partial: {row['video']}: {row['decode_error']}")


def summarize(output_dir: Path, inputs: Sequence[Path]) -> int:
    """Write summary.json and summary.csv into `output_dir` and print the counts.

    The videos are those `output_dir` holds results or error records of (`result_keys`), and those
    among `inputs` (files or folders, as for a run), which count as missing when they have neither.
    A report: it exits 0 even when videos failed. Jobs may run it at the same time.
    """
    if not output_dir.is_dir():
        raise UsageError(f"{output_dir}: no such output folder to summarize")
    videos = collect_videos(inputs, output_dir)
    try:
        keys = result_keys(output_dir) | {video.key for video in videos}
        rows = [summary_row(output_dir, key) for key in sorted(keys)]
        counts = {
            status: sum(row["status"] == status for row in rows)
            for status in ("done", "partial", "failed", "missing")
        }
        summary = {"generated_at": now_iso(), "output_dir": str(output_dir), "counts": counts, "videos": rows}
        write_json(output_dir / "summary.json", summary)
        write_text_atomically(output_dir / "summary.csv", summary_csv(rows))
    except OSError as error:
        raise UsageError(f"{output_dir}: cannot summarize: {one_line(error)}") from None
    print_summary(output_dir, counts, rows)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def check_device(args: argparse.Namespace) -> int:
    """--check-device: say what a run would compute on, or fail the way a run would."""
    device = choose_device(args.device)
    print(describe_device(device, choose_dtype(args.dtype, device)))
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    # Before anything else: a worker that cannot see its GPU must fail now, not crawl for hours.
    device = choose_device(args.device)
    dtype = choose_dtype(args.dtype, device)
    videos = collect_videos(args.inputs, args.output_dir)
    videos = select_shard(videos, args.shard_index, args.num_shards)
    if args.num_shards > 1:
        log(
            f"shard {args.shard_index}/{args.num_shards}: {len(videos)} videos: {', '.join(v.key for v in videos)}"
        )
    if not videos:
        log("nothing to do: this shard has no videos")
        return EXIT_OK
    check_output_dir(args.output_dir)
    paths_of = {video: output_paths(args.output_dir, video.key) for video in videos}
    todo = []
    for video in videos:
        paths = paths_of[video]
        metadata = {} if args.overwrite else read_record(paths["metadata"])
        if metadata.get("status") == "complete":
            problems = output_problems(paths["folder"], metadata)
            change = source_change(metadata, video)
            if not problems and not change:
                log(f"skip {video.path}: complete in {paths['folder']} (--overwrite to redo)")
                continue
            if change:
                log(f"redo {video.path}: the results in {paths['folder']} were {change}")
            else:
                log(f"redo {video.path}: its results in {paths['folder']} are not whole: {'; '.join(problems)}")
        todo.append(video)
    failures: list[str] = []
    for video in [video for video in todo if video.size is None]:  # fail these before the slow model load
        todo.remove(video)
        failures.append(record_failure(video, paths_of[video], VideoError(f"{video.path}: no such file")))
        log(f"FAILED {failures[-1]}")
    if not todo:
        return EXIT_FAILED if failures else EXIT_OK

    segmenter = load_segmenter(args.model, device, dtype)
    check_prompts(segmenter.processor, args.prompts)
    log(f"model {args.model}, prompts {args.prompts}, SAM3 post-processing: {segmenter.postprocessing}")
    log(describe_device(device, dtype))

    for number, video in enumerate(tqdm(todo, unit="video", desc="videos", dynamic_ncols=True), start=1):
        paths = paths_of[video]
        log(f"{number}/{len(todo)} - {video.path}")
        try:
            metadata = process_video(video, paths, segmenter, args)
        except Exception as error:  # one bad video never stops the others
            failures.append(record_failure(video, paths, error))
            log(f"FAILED {failures[-1]}")
            continue
        write_json(paths["metadata"], metadata)
        paths["error"].unlink(missing_ok=True)
        if metadata["decode_error"]:
            log(
                f"warning: {video.path}: decoding stopped after {metadata['sampled_timestamps'][-1]:.1f} s "
                f"({metadata['frames_processed']} of ~{metadata['frames_expected']} frames kept): "
                f"{metadata['decode_error']}"
            )
        log(
            f"done {video.path.name}: {metadata['frames_processed']} frames, {metadata['objects_detected']} objects "
            f"{metadata['objects_per_prompt']}, {metadata['frames_per_second']} frames/s -> {paths['video']}"
        )
    log(f"{len(videos) - len(failures)} of {len(videos)} videos complete, {len(failures)} failed")
    for message in failures:
        log(f"  failed: {message}")
    return EXIT_FAILED if failures else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Let `sky jobs cancel` and preemption notices unwind through the cleanup code.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        if args.check_device:
            return check_device(args)
        if args.summarize is not None:
            return summarize(args.summarize, args.inputs)
        return run(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
