"""Video in and out: decode and sample frames upright as a player shows them; encode browser-playable H.264."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from sam3_pipeline.messages import VideoError, one_line

ENCODER_OPTIONS = {"crf": "23", "preset": "veryfast"}
IDENTITY_TRANSFORM = (1, 0, 0, 1)  # display matrix signs (a, b, c, d) of an upright frame


@dataclasses.dataclass(frozen=True)
class SampledFrame:
    """One decoded frame chosen by the sampler."""

    source_index: int  # index of the frame in decode order
    timestamp: float  # seconds since the first frame
    rgb: np.ndarray  # (H, W, 3) uint8 RGB


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video before decoding it."""

    width: int
    height: int
    fps: Fraction  # average frame rate
    duration: float | None  # seconds, None when the container does not say


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
