"""Video in and out: decode and sample frames upright as a player shows them; encode browser-playable H.264."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from sam3_pipeline.messages import VideoError, one_line

# No macroblock-tree rate control: with it, libx264 reads memory it never wrote (seen here: the
# same frames gave different bytes after the heap had held other data), so runs and the serial
# and side-by-side pipelines did not make the same files. Without it a file is ~20% larger.
# One thread: libx264's default follows the core count, and with it the bytes (a window encoded on
# 1 and on 2 cores gave 30,506 and 30,734 bytes), so workers that compute the same window would
# disagree. One thread encodes 720p at ~140 frames/s here, far ahead of SAM3 on any GPU.
ENCODER_OPTIONS = {"crf": "23", "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}
IDENTITY_TRANSFORM = (1, 0, 0, 1)  # display matrix signs (a, b, c, d) of an upright frame
DEFAULT_FRAME_RATE = 25  # for a stream that states no frame rate at all
# Longer than this without a frame, the timestamps have jumped (a splice, a clock reset) rather
# than the video paused: `VideoClock`.
MAX_FRAME_GAP = Fraction(5)  # seconds
# Containers with an index whose timestamps never restart (FFmpeg format names).
SEEKABLE_FORMATS = frozenset({"mov", "mp4", "matroska", "webm", "avi"})


@dataclasses.dataclass(frozen=True)
class SampledFrame:
    """One decoded frame chosen by the sampler."""

    source_index: int  # the frame's number in the source: its time x the average frame rate, rounded
    timestamp: float  # seconds of video time since the first frame
    rgb: np.ndarray  # (H, W, 3) uint8 RGB
    position: int  # its point on the sampling grid (`sample_frames`): what places it in a window
    size_changes: int = 0  # decoded frames since the sample before whose coded size changed
    timestamp_discontinuities: int = 0  # restarts and jumps of the timestamps since the sample before
    frames_behind: int = 0  # frames dropped since the sample before: their timestamps went back (`VideoClock`)


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video before decoding it."""

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
    return VideoInfo(fps=Fraction(fps), duration=duration)


def output_rate(sample_fps: Fraction, source_fps: Fraction) -> Fraction:
    """Frame rate of the output MP4: the sample rate, or the source rate when sampling every frame
    or when the source has fewer frames than asked for."""
    if sample_fps <= 0:
        return source_fps
    return min(Fraction(sample_fps), source_fps)


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


@dataclasses.dataclass(frozen=True)
class FrameGeometry:
    """How decoded frames become the frames SAM3 and the MP4 see, fixed by the first frame:
    resampled to square pixels (keeping the height), then turned as the display matrix says."""

    stored: tuple[int, int]  # (W, H) of the first frame as coded
    square: tuple[int, int]  # (W, H) of the first frame in square pixels, before the display matrix
    sample_aspect_ratio: Fraction  # width of a stored pixel over its height
    transform: tuple[int, int, int, int]  # display matrix signs, see `display_transform`


def frame_geometry(frame: av.VideoFrame, stream: av.video.stream.VideoStream) -> FrameGeometry:
    """The geometry of a video, from its first frame and its stream's sample aspect ratio.

    The stream's ratio is the container's where it has one (MP4 `pasp`, Matroska display size), else
    the codec's, as FFmpeg's players choose. Ratios outside 1/4..4 are taken for broken headers.
    """
    ratio = Fraction(stream.sample_aspect_ratio or 1)
    if not Fraction(1, 4) <= ratio <= 4:
        ratio = Fraction(1)
    square_width = max(round(frame.width * ratio), 1)
    return FrameGeometry(
        stored=(frame.width, frame.height),
        square=(square_width, frame.height),
        sample_aspect_ratio=ratio,
        transform=display_transform(frame),
    )


def fit_inside(size: tuple[int, int], bounds: tuple[int, int]) -> tuple[int, int]:
    """The largest (W, H) with the aspect ratio of `size` that fits in `bounds` (W, H)."""
    scale = min(bounds[0] / size[0], bounds[1] / size[1])
    return min(max(round(size[0] * scale), 1), bounds[0]), min(max(round(size[1] * scale), 1), bounds[1])


def frame_rgb(frame: av.VideoFrame, geometry: FrameGeometry) -> np.ndarray:
    """A decoded frame as a player shows it, at the video's one output size.

    Returns (H, W, 3) uint8 RGB, H x W the first frame's square-pixel size turned by the display
    matrix. A frame of another coded size (a stream that changes resolution) is scaled to fit that
    size, centred on black where its shape differs. Resampling happens in FFmpeg's scaler, in the
    same pass as the conversion to RGB.
    """
    width, height = geometry.square
    if (frame.width, frame.height) == geometry.stored:
        if geometry.square == geometry.stored:
            return to_display(frame.to_ndarray(format="rgb24"), geometry.transform)
        return to_display(frame.to_ndarray(format="rgb24", width=width, height=height), geometry.transform)
    shape = (frame.width * geometry.sample_aspect_ratio, frame.height)
    fit_width, fit_height = fit_inside(shape, geometry.square)
    scaled = frame.to_ndarray(format="rgb24", width=fit_width, height=fit_height)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    top, left = (height - fit_height) // 2, (width - fit_width) // 2
    canvas[top : top + fit_height, left : left + fit_width] = scaled
    return to_display(canvas, geometry.transform)


class VideoClock:
    """Video time of decoded frames: seconds since the first frame, continuous where the
    timestamps are not.

    Recorders that restart (parts joined with `cat`, a camera that resets its clock) make the
    timestamps jump back; splices can make them jump far ahead. At such a break the video time
    goes on one frame interval after the frame before it, and `breaks` counts it. Gaps shorter
    than MAX_FRAME_GAP (or two frame intervals, where frames are that sparse) are real: time runs
    on through them.

    In containers with an index (`seekable`) video time is the timestamp less the first one, so
    that their windows can be found by seeking, each window's time computed without the frames
    before it: a jump ahead is a pause however long, and a frame whose timestamp is not after the
    one before (parts that overlap in time, remuxed into one file) has no time of its own:
    `time_of` gives None and the sampler drops it. `origin` (the first frame's timestamp) starts a
    clock part way through such a video.
    """

    def __init__(
        self,
        time_base: Fraction | None,
        frame_interval: Fraction,
        *,
        jumps_are_breaks: bool = True,
        origin: Fraction | None = None,
    ) -> None:
        self.time_base = time_base
        self.frame_interval = frame_interval
        self.max_gap = max(MAX_FRAME_GAP, 2 * frame_interval) if jumps_are_breaks else None
        self.offset: Fraction | None = None if origin is None else -origin  # video time minus timestamp
        self.last_stamp: Fraction | None = None
        self.last_time: Fraction | None = None
        self.breaks = 0

    def stamp(self, frame: av.VideoFrame) -> Fraction | None:
        """The frame's timestamp in seconds, None when it has none."""
        return frame.pts * self.time_base if frame.pts is not None and self.time_base else None

    def time_of(self, frame: av.VideoFrame) -> Fraction | None:
        """The frame's video time; None for a frame not after the one before in a seekable container."""
        stamp = self.stamp(frame)
        after_last = Fraction(0) if self.last_time is None else self.last_time + self.frame_interval
        if stamp is None:  # one frame interval after the frame before
            time = after_last
        else:
            if self.offset is None:  # the first timestamp
                self.offset = after_last - stamp
            elif self.last_stamp is not None and self.max_gap is None:
                if stamp <= self.last_stamp:
                    return None
            elif self.last_stamp is not None and not self.last_stamp <= stamp <= self.last_stamp + self.max_gap:
                self.offset = after_last - stamp
                self.breaks += 1
            self.last_stamp = stamp
            time = stamp + self.offset
        self.last_time = time
        return time


@dataclasses.dataclass
class DecodeReport:
    """What decoding found out on the way through a video."""

    geometry: FrameGeometry | None = None  # set by the first frame
    error: str | None = None  # why decoding stopped before the end of the video, if it did
    timestamp_discontinuities: int = 0  # restarts and jumps of the timestamps (`VideoClock`)
    frames_behind: int = 0  # frames dropped for a timestamp that went back (`VideoClock`)
    size_changes: int = 0  # frames whose coded size differs from the frame before
    frames_decoded: int = 0  # every frame the decoder gave, sampled or not
    seeked: bool = False  # decoding started at a keyframe part way through

    @property
    def transform(self) -> tuple[int, int, int, int]:
        return self.geometry.transform if self.geometry else IDENTITY_TRANSFORM


def seekable(container: av.container.InputContainer) -> bool:
    """Whether frames can be found by seeking to their time: containers with an index and
    timestamps that never restart. MPEG-TS and PS (whose recordings are joined with `cat`) and
    raw streams are read from the start."""
    return bool(SEEKABLE_FORMATS & set(container.format.name.split(",")))


def position_rate(sample_fps: Fraction | float, source_fps: Fraction) -> Fraction:
    """Positions per second of video time: the sample rate, or the source's average frame rate
    when every frame is kept. A sample's position is its place on that grid (`sample_frames`)."""
    return Fraction(sample_fps) if sample_fps > 0 else Fraction(source_fps)


class _SeekMissed(Exception):
    """A seek landed after the frame asked for: seek further back (or, where the container's
    index cannot be trusted, read from the start)."""

    def __init__(self, trust_index: bool = True) -> None:
        super().__init__()
        self.trust_index = trust_index


def sample_frames(
    container: av.container.InputContainer,
    sample_fps: Fraction | float,
    max_frames: int,
    report: DecodeReport | None = None,
    after: int | None = None,
) -> Iterator[SampledFrame]:
    """Decode the first video stream and yield one frame per 1/sample_fps seconds of video time
    (every frame for 0), as a player shows it (`frame_rgb`).

    Sample k is the first frame after k / sample_fps seconds of video time (`VideoClock`) less
    half a frame interval (the stream's average interval, or the interval since the frame before
    where that is shorter): the frame nearest that time, the later one on a tie. Each frame owns
    the grid points from its predecessor's bound up to its own, so the choice depends on the two
    frames alone and comes out the same wherever decoding started. Timestamps rounded to the
    container's time base (milliseconds in Matroska and WebM) fall just before the exact grid.
    Times are exact fractions, so 29.97 fps and variable-frame-rate videos do not drift; a grid
    point inside a gap in the video is not made up with a repeated frame. A sample's `position`
    is its grid point (every frame: its time x the average rate, rounded); positions from
    `max_frames` on are not read. Only chosen frames are converted to RGB.

    after: None for every sample; else the last sample at a position <= `after` (the frame one
    window shares with the one before it), then every sample after it. Where the container allows
    (`seekable`), decoding then starts at the keyframe before that point rather than at the start.

    A decode error after the first sample ends the video early (a file cut short keeps what
    decoded) and is recorded in `report`; before it, the error is raised.
    """
    report = report if report is not None else DecodeReport()
    stream = container.streams.video[0]
    margin = 3 / Fraction(stream.average_rate or stream.guessed_rate or DEFAULT_FRAME_RATE)
    while after is not None and seekable(container):
        try:
            yield from _samples(container, sample_fps, max_frames, report, after, margin)
            return
        except _SeekMissed as missed:  # raised before any sample was yielded
            report.error, report.seeked = None, False
            report.timestamp_discontinuities = report.size_changes = report.frames_behind = 0
            container.seek(0)
            if not missed.trust_index:
                break
            margin = 4 * margin + 1  # the sample before the window lies further back (a gap, or the end)
    yield from _samples(container, sample_fps, max_frames, report, after, None)


def _samples(
    container: av.container.InputContainer,
    sample_fps: Fraction | float,
    max_frames: int,
    report: DecodeReport,
    after: int | None,
    margin: Fraction | None,
) -> Iterator[SampledFrame]:
    """`sample_frames`, decoding from the keyframe before `margin` seconds ahead of the frame
    before position `after`, or from the start where `margin` is None."""
    stream = container.streams.video[0]
    average = Fraction(stream.average_rate or stream.guessed_rate or DEFAULT_FRAME_RATE)
    frame_interval = 1 / average
    rate = position_rate(sample_fps, average)
    interval = 1 / Fraction(sample_fps) if sample_fps > 0 else None
    time_base = Fraction(stream.time_base) if stream.time_base else None
    clock = VideoClock(time_base, frame_interval, jumps_are_breaks=not seekable(container))
    decoded = container.decode(stream)
    warmup = 0  # frames after a seek whose bounds are not known yet (they need the frame before)
    if margin is not None:
        first = next(decoded, None)  # its timestamp anchors video time; it fixes the geometry
        origin = clock.stamp(first) if first is not None else None
        if origin is None:  # no timestamp to seek by
            raise _SeekMissed(trust_index=False)
        report.frames_decoded += 1
        report.geometry = report.geometry or frame_geometry(first, stream)
        target = origin + (after - 1) / rate - margin
        if target <= origin:  # the start is as near: read on from there
            decoded = itertools.chain([first], decoded)
        else:
            container.seek(int(target / time_base), stream=stream)
            decoded = container.decode(stream)
            clock = VideoClock(time_base, frame_interval, jumps_are_breaks=False, origin=origin)
            report.seeked, warmup = True, 2
    previous: Fraction | None = None
    previous_bound: Fraction | None = None
    coded_size: tuple[int, int] | None = None
    pending: tuple[av.VideoFrame, Fraction, int, int] | None = None  # the sample at or before `after`
    changes = breaks = behind = 0  # since the last sample
    sampled = 0
    while True:
        try:
            frame = next(decoded)
        except StopIteration:
            break
        except av.FFmpegError as error:
            if not (sampled or pending or after):
                raise
            report.error = one_line(error)
            break
        report.frames_decoded += 1
        breaks_before = clock.breaks
        elapsed = clock.time_of(frame)
        if elapsed is None:
            behind += 1
            report.frames_behind += 1
            continue
        if report.seeked and warmup == 2 and elapsed > target - origin + frame_interval:
            raise _SeekMissed(trust_index=False)  # it landed after the point asked for
        breaks += clock.breaks - breaks_before
        report.timestamp_discontinuities += clock.breaks - breaks_before
        if coded_size not in (None, (frame.width, frame.height)):
            changes += 1
            report.size_changes += 1
        coded_size = (frame.width, frame.height)
        spacing = elapsed - previous if previous is not None and elapsed > previous else frame_interval
        bound = elapsed + min(spacing, frame_interval) / 2  # where the rate varies, the local interval
        lower, previous_bound, previous = previous_bound, bound, elapsed
        if warmup:
            warmup -= 1
            changes = breaks = behind = 0
            continue
        if interval is None:
            position = math.floor(elapsed * rate + Fraction(1, 2))
        else:  # the grid points in [lower, bound) are this frame's
            first_point = 0 if lower is None else math.ceil(lower / interval)
            position = math.ceil(bound / interval) - 1
            if position < first_point:
                continue
        if max_frames and position >= max_frames:
            break
        index = math.floor(elapsed * average + Fraction(1, 2))
        if after is not None and position <= after:
            pending = (frame, elapsed, index, position)
            changes = breaks = behind = 0  # counted by the window before
            continue
        if after is not None:
            if pending is None:  # only after a seek: the first frame of all is at position 0
                raise _SeekMissed  # the frame the window shares lies before the keyframe
            yield _sampled(stream, report, *pending)
            sampled += 1
            pending, after = None, None
        yield _sampled(stream, report, frame, elapsed, index, position, changes, breaks, behind)
        sampled += 1
        changes = breaks = behind = 0
    if pending is not None:  # the video ends with the shared frame: a window without frames of its own
        yield _sampled(stream, report, *pending)
    elif report.seeked and after is not None:
        raise _SeekMissed  # nothing at all after the seek


def _sampled(
    stream: av.video.stream.VideoStream,
    report: DecodeReport,
    frame: av.VideoFrame,
    elapsed: Fraction,
    index: int,
    position: int,
    changes: int = 0,
    breaks: int = 0,
    behind: int = 0,
) -> SampledFrame:
    report.geometry = report.geometry or frame_geometry(frame, stream)
    return SampledFrame(
        source_index=index,
        timestamp=float(elapsed),
        rgb=frame_rgb(frame, report.geometry),
        position=position,
        size_changes=changes,
        timestamp_discontinuities=breaks,
        frames_behind=behind,
    )


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


def join_mp4(parts: Sequence[Path], destination: Path) -> None:
    """Join MP4s that `H264Writer` made with the same size and rate into one faststart MP4 at
    `destination`, one after another, without re-encoding: each part starts with a keyframe, so
    its packets are copied as they are, shifted in time by the parts before it."""
    with av.open(str(destination), mode="w", format="mp4", options={"movflags": "+faststart"}) as output:
        joined = None
        offset = 0  # in the parts' time base
        for part in parts:
            with av.open(str(part)) as source:
                stream = source.streams.video[0]
                encoding = (stream.codec_context.extradata, stream.time_base, stream.width, stream.height)
                if joined is None:
                    joined, first = output.add_stream_from_template(stream), encoding
                elif encoding != first:
                    raise ValueError(f"{part.name} was encoded differently from {parts[0].name}")
                end = offset
                for packet in source.demux(stream):
                    if packet.size == 0:  # the demuxer's end-of-stream marker
                        continue
                    end = max(end, offset + packet.pts + packet.duration)
                    packet.pts += offset
                    packet.dts += offset
                    packet.stream = joined
                    output.mux(packet)
                offset = end


def read_frames(path: Path, numbers: Iterable[int]) -> dict[int, np.ndarray]:
    """Frames of a video by their number in decode order, as (H, W, 3) uint8 RGB; decoding stops
    after the last one asked for."""
    wanted = set(numbers)
    found: dict[int, np.ndarray] = {}
    if not wanted:
        return found
    with av.open(str(path)) as container:
        for number, frame in enumerate(container.decode(video=0)):
            if number in wanted:
                found[number] = frame.to_ndarray(format="rgb24")
                if len(found) == len(wanted):
                    break
    return found
