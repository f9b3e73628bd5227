"""Synthetic soccer-like videos for the tests and the benchmark.

Its own module, without pytest, so that bench/benchmark.py can make its clips where only the
script's own dependencies are installed (a lent GPU machine).
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

PITCH_GREEN = (40, 140, 60)


def pitch_frame(index: int, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB: a green pitch, a white line, three players and a ball that move with `index`."""
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[:] = PITCH_GREEN
    frame[:, width // 2 - 1 : width // 2 + 1] = 255
    unit = max(height // 12, 2)
    for player, color in enumerate([(200, 30, 30), (30, 30, 200), (200, 30, 30)]):
        x = (index * (player + 2) * 3 + player * width // 3) % max(width - unit, 1)
        y = height // 4 + player * height // 5
        frame[y : y + 2 * unit, x : x + unit] = color
    bx = (index * 5) % max(width - unit // 2, 1)
    frame[height - 2 * unit : height - 2 * unit + unit // 2, bx : bx + unit // 2] = 255
    return frame


def write_test_video(
    path: Path,
    seconds: float = 2.0,
    fps: Fraction | float | str = 25,
    size: tuple[int, int] = (160, 96),
    frame_times: Sequence[float] | None = None,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
) -> Path:
    """Write a video (H.264 MP4 by default) of `pitch_frame`s.

    size is (width, height). frame_times (seconds), when given, makes a variable-frame-rate file
    with those presentation times (millisecond time base) instead of a constant `fps`.
    """
    width, height = size
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if frame_times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
            pts = [round(t * 1000) for t in frame_times]
        else:
            pts = list(range(round(seconds * rate)))
        for index, value in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(pitch_frame(index, width, height), format="rgb24")
            frame.pts = value
            if frame_times is not None:
                frame.time_base = Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path
