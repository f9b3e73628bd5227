"""Debian's ffmpeg and ffprobe for tests whose inputs must come from encoders and muxers nobody
here wrote (see /work/shared/notes/real-world-inputs.md)."""

from __future__ import annotations

import json
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

FFMPEG, FFPROBE = shutil.which("ffmpeg"), shutil.which("ffprobe")
QUIET = ["-hide_banner", "-loglevel", "error", "-nostdin", "-y"]


def require_ffmpeg() -> None:
    """Skip the calling test module where ffmpeg is not installed (.ci/run installs it)."""
    if not (FFMPEG and FFPROBE):
        pytest.skip(
            "ffmpeg and ffprobe are needed to make these inputs (Debian: apt-get install ffmpeg)",
            allow_module_level=True,
        )


def ffmpeg(*args: str | Path) -> None:
    subprocess.run([FFMPEG, *QUIET, *map(str, args)], check=True, capture_output=True)


def ffprobe_stream(video: Path) -> dict[str, Any]:
    """ffprobe's view of the first video stream, with its frames counted by decoding them
    (`nb_read_frames`) and the container's duration (`duration`, seconds)."""
    probe = subprocess.run(
        [FFPROBE, "-v", "error", "-count_frames", "-select_streams", "v:0", "-of", "json"]
        + ["-show_entries", "stream=width,height,sample_aspect_ratio,avg_frame_rate,nb_read_frames:format=duration"]
        + [str(video)],
        capture_output=True,
        text=True,
        check=True,
    )
    parsed = json.loads(probe.stdout)
    stream = parsed["streams"][0]
    stream["nb_read_frames"] = int(stream["nb_read_frames"])
    stream["avg_frame_rate"] = Fraction(stream["avg_frame_rate"])
    stream["duration"] = float(parsed["format"]["duration"])
    return stream


def frame_times(video: Path) -> list[Fraction]:
    """Each frame's presentation time as ffprobe lists it, in seconds from the first frame.

    ffprobe prints each time as exact decimals (trailing fields and blank lines come from side
    data); a cut file still lists the frames that decode, and ffprobe exits 0.
    """
    listing = subprocess.run(
        [FFPROBE, "-v", "error", "-select_streams", "v:0", "-show_entries", "frame=pts_time"]
        + ["-of", "csv=p=0", str(video)],
        capture_output=True,
        text=True,
    ).stdout
    fields = [line.split(",")[0] for line in listing.splitlines()]
    times = [Fraction(field) for field in fields if field not in ("", "N/A")]
    assert times, f"ffprobe lists no frame times for {video}"
    return [time - times[0] for time in times]


def decode_rgb(video: Path, *filters: str) -> list[np.ndarray]:
    """Every frame as ffmpeg's own CLI decodes it (through the video `filters`, if any), each
    (H, W, 3) uint8 RGB at its own size. ffmpeg renumbers frames by their timestamps unless told
    to pass them through, which a stream whose timestamps restart needs."""
    chain = ["-vf", ",".join(filters)] if filters else []
    raw = subprocess.run(
        [FFMPEG, *QUIET, "-i", str(video), *chain, "-fps_mode", "passthrough", "-f", "image2pipe"]
        + ["-vcodec", "ppm", "-"],
        capture_output=True,
        check=True,
    ).stdout
    frames, offset = [], 0
    while offset < len(raw):  # each frame a binary PPM: "P6\n<width> <height>\n255\n" and the pixels
        magic, size, depth, _ = raw[offset : offset + 64].split(b"\n", 3)
        width, height = map(int, size.split())
        start = offset + len(magic) + len(size) + len(depth) + 3
        frames.append(np.frombuffer(raw, np.uint8, width * height * 3, start).reshape(height, width, 3))
        offset = start + width * height * 3
    return frames
