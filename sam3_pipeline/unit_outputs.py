"""A unit's outputs stage: SAM3's frames in, each window's overlay, tracks and record out.

It runs in the outputs process (stages.ChildProcess) or, with --serial, in the main one; the
window files go through `windows.WindowWriter`, each window's record written last.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Container, Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

from sam3_pipeline.outputs import scratch_dir
from sam3_pipeline.sam3 import ModelFrame, detections_from, window_of
from sam3_pipeline.stages import StageTimes
from sam3_pipeline.video_io import DecodeReport, SampledFrame
from sam3_pipeline.windows import WindowWriter


@dataclasses.dataclass(frozen=True)
class WindowTimes:
    """Sent to the outputs stage after a window's last frame: this process's seconds on it (the
    decode thread runs a few frames ahead, so the split between windows is approximate)."""

    window: int
    stage_seconds: dict[str, float]
    frames_decoded: int  # by the unit so far, sampled or not


@dataclasses.dataclass(frozen=True)
class UnitEnd:
    """Sent to the outputs stage last: how the unit's stretch of video ended."""

    final: bool  # the video ended (not just the unit's last window)
    last_window: int  # the window of the last frame read
    decode_error: str | None


class WindowBound:
    """Samples up to the end of window `last` (None: to the end of the video), noting where they
    stopped: `final` when the video ended first."""

    def __init__(self, samples: Iterable[SampledFrame], last: int | None, chunk_frames: int) -> None:
        self.samples, self.last, self.chunk_frames = samples, last, chunk_frames
        self.final = True
        self.last_window = 0

    def __iter__(self) -> Iterator[SampledFrame]:
        for sample in self.samples:
            window = window_of(sample.position, self.chunk_frames)
            if self.last is not None and window > self.last:
                self.final = False
                return
            self.last_window = window
            yield sample


def draw_and_record(
    items: Iterable[ModelFrame | WindowTimes | UnitEnd],
    folder: Path,
    size: tuple[int, int],
    fps: Fraction,
    write_tracks: bool,
    first_window: int,
    skip: Container[int],
    facts: dict[str, Any],
    started: float,
) -> list[dict[str, Any]]:
    """The outputs stage of a unit: per frame, masks from SAM3's output, the overlay (encoded to
    H.264) and the tracks, written window by window into the video's `windows/` folder, each
    window's record last. Windows without frames of their own (a gap, or past the end of the
    video) get a record too, so that nothing is waited for. size: (H, W) of every frame; started:
    time.monotonic() when the unit began (the first window's seconds count from there, each
    later one's from the end of the one before). Returns the records written."""
    records: list[dict[str, Any]] = []
    timing: dict[int, WindowTimes] = {}
    writer: WindowWriter | None = None
    next_window = first_window  # the first window without a record from this unit yet
    ended = [started]  # when work on the last window ended
    with scratch_dir() as scratch:

        def publish(window: WindowWriter, final: bool, decode_error: str | None = None) -> None:
            parent = timing.get(window.window)
            if parent:  # this process's stages come first in the record, as in the pipeline
                merged = collections.Counter(parent.stage_seconds)
                merged.update(window.times.seconds)
                window.times.seconds = merged
            unit = {"final": final, "decode_error": decode_error, "frames_decoded": parent and parent.frames_decoded}
            records.append(window.publish(folder, {**facts, **unit}))
            ended.append(time.monotonic())

        def new_window(window: int) -> WindowWriter:
            return WindowWriter(window, Path(scratch), size, fps, write_tracks, StageTimes(), ended[-1])

        for item in items:
            if isinstance(item, WindowTimes):
                timing[item.window] = item
                continue
            if isinstance(item, UnitEnd):
                last = max(item.last_window, first_window)
                ending = {"final": item.final, "decode_error": item.decode_error}
                if writer:
                    publish(writer, **(ending if writer.window == last else {"final": False}))
                for window in range(next_window, last + 1):
                    if window not in skip:
                        publish(new_window(window), **(ending if window == last else {"final": False}))
                break
            if writer is None or item.window != writer.window:
                if writer:
                    publish(writer, final=False)
                for window in range(next_window, item.window):
                    if window not in skip:
                        publish(new_window(window), final=False)
                writer, next_window = new_window(item.window), item.window + 1
            with writer.times.measure("masks"):
                detections = detections_from(item.output, size)
            if item.shared:
                writer.share(detections)
            else:
                writer.add(item.sample, detections)
    return records


def unit_items(
    outputs: Iterable[ModelFrame], times: StageTimes, report: DecodeReport, bound: WindowBound
) -> Iterator[ModelFrame | WindowTimes | UnitEnd]:
    """SAM3's output for the outputs stage, each window followed by this process's time on it,
    and the unit's end."""
    window: int | None = None
    mark = collections.Counter(times.seconds)

    def window_times(window: int) -> WindowTimes:
        nonlocal mark
        now = collections.Counter(times.seconds)
        spent = {stage: round(seconds, 3) for stage, seconds in (now - mark).items()}
        mark = now
        return WindowTimes(window, spent, report.frames_decoded)

    for frame in outputs:
        if window is not None and frame.window != window:
            yield window_times(window)
        window = frame.window
        yield frame
    if window is not None:
        yield window_times(window)
    yield UnitEnd(bound.final, bound.last_window, report.error)
