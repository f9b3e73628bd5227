"""A job's work on one video: its units through the stages (decode -> SAM3 -> outputs), their
window records, the video's assembly once every window is there, and a failure's record."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import time
import traceback
from collections.abc import Callable, Container, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import torch
from tqdm import tqdm

from sam3_pipeline.assembly import assemble_and_record
from sam3_pipeline.dataset import Unit, Video
from sam3_pipeline.device import dtype_name
from sam3_pipeline.files import now_iso, read_record, write_json
from sam3_pipeline.messages import VideoError, log, one_line, redact
from sam3_pipeline.options import RunSettings, Share
from sam3_pipeline.planning import Triage, recipe, units_of, usable
from sam3_pipeline.progress import ENDED, JobLog
from sam3_pipeline.sam3 import ModelFrame, Segmenter, model_frames, prepare_frames, shared_position
from sam3_pipeline.stages import ChildProcess, RunAhead, StageTimes
from sam3_pipeline.unit_outputs import WindowBound, draw_and_record, unit_items
from sam3_pipeline.video_io import (
    DecodeReport,
    VideoInfo,
    display_rotation,
    output_rate,
    position_rate,
    read_video_info,
    sample_frames,
)
from sam3_pipeline.windows import BrokenWindows, complete_run, computed_by, done_windows, window_count

# Frames waiting between two stages: enough to ride out one slow frame, few enough that memory
# stays flat (a 720p frame with SAM3's input is ~15 MB; its 20 objects' logits ~7 MB).
STAGE_QUEUE_DEPTH = 4


@dataclasses.dataclass(frozen=True)
class Computation:
    """How this job computes its windows: with what (`settings`), the stages side by side or one
    after another (`serial`), and as which share of the launch (recorded in each window)."""

    settings: RunSettings
    serial: bool
    share: Share


def unit_facts(
    video: Video,
    info: VideoInfo,
    report: DecodeReport,
    size: tuple[int, int],
    fps_out: Fraction,
    how: Computation,
    segmenter: Segmenter,
    plan: dict[str, Any] | None,
) -> dict[str, Any]:
    """What every window record of the video carries: the recipe, the plan its windows follow
    (`plan_video`), the video as the metadata describes it, how and by whom it was computed."""
    rotation, mirrored = display_rotation(report.transform)
    geometry = report.geometry
    return {
        "recipe": recipe(video, how.settings),
        "plan": plan,
        "video": {
            "key": video.key,
            "video_name": video.path.name,
            "source_path": str(video.path),
            "source_name": video.path.name,
            "source_bytes": video.size,  # as listed, which is what the next run compares
            "width": size[1],
            "height": size[0],
            "stored_width": geometry.stored[0],
            "stored_height": geometry.stored[1],
            "sample_aspect_ratio": "{0.numerator}:{0.denominator}".format(geometry.sample_aspect_ratio),
            "rotation": rotation,
            "mirrored": mirrored,
            "duration_seconds": info.duration,
            "original_fps": float(info.fps),
            "sample_fps": float(how.settings.sample_fps),
            "output_fps": float(fps_out),
            "max_frames": how.settings.max_frames,
            "frames_expected": (
                min(math.ceil(info.duration * fps_out), how.settings.max_frames or math.inf) if info.duration else None
            ),
        },
        "device": str(segmenter.device),
        "dtype": dtype_name(segmenter.dtype),
        "postprocessing": segmenter.postprocessing,
        "pipeline": "serial" if how.serial else "overlapped",
        "computed_by": computed_by(how.share.index, how.share.count),
        "seeked": report.seeked,
    }


def process_unit(
    unit: Unit,
    paths: dict[str, Path],
    segmenter: Segmenter,
    how: Computation,
    plan: dict[str, Any] | None,
    skip: Container[int],
    on_window: Callable[[int, int, float], None],
) -> list[dict[str, Any]]:
    """Compute a unit's windows (those not in `skip`): decode -> SAM3 -> masks, overlay, H.264 and
    tracks, frame by frame, the stages side by side (unless `how.serial`). Each window's results are
    in place as soon as it is done; returns their records. on_window(window, sampled frames,
    seconds): called as SAM3 finishes each window, with the time since the one before (or since
    the unit began)."""
    started = time.monotonic()
    source = unit.video.path
    settings = how.settings
    chunk = settings.chunk_frames
    try:
        container = av.open(str(source))
    except (av.FFmpegError, OSError) as error:
        raise VideoError(f"{source}: not a readable video: {one_line(error)}") from None

    paths["folder"].mkdir(parents=True, exist_ok=True)
    report = DecodeReport()
    with container:
        info = read_video_info(container, source)
        fps_out = output_rate(settings.sample_fps, info.fps)
        times = StageTimes()
        after = shared_position(unit.first, chunk) if unit.first else None
        samples = sample_frames(container, settings.sample_fps, settings.max_frames, report, after)
        bound = WindowBound(samples, unit.last, chunk)
        frames = times.iterate("decode", bound)
        try:
            first = next(frames, None)
        except av.FFmpegError as error:
            raise VideoError(f"{source}: cannot decode: {one_line(error)}") from None
        if first is None:
            raise VideoError(f"{source}: no frames could be decoded")
        size = first.rgb.shape[:2]  # as displayed: (H, W) after the display matrix
        facts = unit_facts(unit.video, info, report, size, fps_out, how, segmenter, plan)
        rate = position_rate(settings.sample_fps, info.fps)
        with contextlib.ExitStack() as stack:
            progress = stack.enter_context(
                tqdm(
                    total=round(unit.weight * min(fps_out / rate, 1)),
                    unit="frame",
                    desc=unit.video.key,
                    leave=False,
                    dynamic_ncols=True,
                )
            )

            def counted(outputs: Iterator[ModelFrame]) -> Iterator[ModelFrame]:
                window, frames, mark = None, 0, started
                for output in outputs:
                    if output.window != window:
                        if window is not None:
                            on_window(window, frames, time.monotonic() - mark)
                            mark = time.monotonic()
                        window, frames = output.window, 0
                    if not output.shared:  # a frame two windows share is one frame of the video
                        progress.update()
                        frames += 1
                    yield output
                if window is not None:
                    on_window(window, frames, time.monotonic() - mark)

            samples = itertools.chain([first], frames)
            finish = (paths["folder"], size, fps_out, settings.tracks, unit.first, skip, facts, started)
            if how.serial:
                prepared = prepare_frames(segmenter, samples, times)
            else:  # the outputs process is forked first, before this process starts a thread
                outputs_process = stack.enter_context(ChildProcess(draw_and_record, finish, STAGE_QUEUE_DEPTH))
                prepared = stack.enter_context(
                    RunAhead(prepare_frames(segmenter, samples, times), STAGE_QUEUE_DEPTH, "decode")
                )
            outputs = counted(model_frames(segmenter, prepared, settings.prompts, chunk, times, unit.first, skip))
            items = unit_items(outputs, times, report, bound)
            return draw_and_record(items, *finish) if how.serial else outputs_process.run(items)


def start_redo(paths: dict[str, Path]) -> None:
    """Remove a video's outdated metadata before anything else about its redo can fail: an old
    "complete" left standing would make the summary and later runs take the video as done."""
    paths["metadata"].unlink(missing_ok=True)


def finished_meanwhile(
    video: Video, paths: dict[str, Path], seen: dict[str, Any], outdated: bool, bucket_lag: float
) -> dict[str, Any] | None:
    """Before a video's work starts, possibly long after its triage: its metadata if another job
    completed it since (then nothing here is redone); else None, after removing the outdated
    metadata triage decided to replace, if it is still the one triage saw. Metadata that is
    merely not whole here is never removed: another worker's files may still be arriving, and the
    assembly replaces it anyway."""
    current = read_record(paths["metadata"])
    if current != seen and usable(current, video, paths["folder"], bucket_lag):
        return current
    if outdated and current == seen:
        start_redo(paths)
    return None


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


def how_often(count: int) -> str:
    return "once" if count == 1 else f"{count} times"


def log_notes(video: Video, metadata: dict[str, Any]) -> None:
    """Warn about what a user would otherwise only find in the metadata."""
    if metadata["decode_error"]:
        expected = f" of ~{metadata['frames_expected']}" if metadata["frames_expected"] else ""
        log(
            f"warning: {video.path}: decoding stopped after {metadata['sampled_timestamps'][-1]:.1f} s "
            f"({metadata['frames_processed']}{expected} frames kept): {metadata['decode_error']}"
        )
    if count := metadata["timestamp_discontinuities"]:
        log(f"note: {video.path}: its timestamps restart or jump {how_often(count)}; video time runs on across them")
    if count := metadata["frames_behind"]:
        log(
            f"warning: {video.path}: {count} frame{'s' if count > 1 else ''} dropped: their timestamps go back "
            "to frames already kept (parts that overlap in time, joined in one file)"
        )
    if count := metadata["size_changes"]:
        log(
            f"note: {video.path}: its frame size changes {how_often(count)}; every frame is scaled to the "
            f"first one's {metadata['width']}x{metadata['height']}"
        )


def finish_video(video: Video, paths: dict[str, Path], windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Assemble a video whose windows are all there and write its metadata, last."""
    metadata = assemble_and_record(paths, windows)
    log_notes(video, metadata)
    log(
        f"done {video.path.name}: {metadata['frames_processed']} frames, {metadata['objects_detected']} objects "
        f"{metadata['objects_per_prompt']}, {metadata['frames_per_second']} frames/s, "
        f"{len(windows)} window{'s' if len(windows) > 1 else ''} -> {paths['video']}"
    )
    return metadata


def compute_video(
    units: Sequence[Unit],
    paths: dict[str, Path],
    segmenter: Segmenter | None,
    how: Computation,
    plan: dict[str, Any] | None,
    done: dict[int, dict[str, Any]],
    numbered: dict[Unit, int],
    job: JobLog,
) -> dict[str, Any] | None:
    """This job's units of one video, those not `done` before (`numbered`: their place in the
    job's work), then the video's assembly if every window is there. Returns its metadata, or
    None while windows of other shares are still to come. Each window computed goes into the
    job's account."""
    video = units[0].video
    on_window = functools.partial(job.computed, video.key)
    planned = window_count(plan and plan["positions"], how.settings.chunk_frames)
    for unit in units:
        whole = unit.last is None and unit.first < planned - 1  # a video read from the start
        span = f"windows {unit.first}-{planned - 1}" if whole else f"window {unit.first}"
        if unit not in numbered:
            log(f"skip {video.path} {span}: computed before")
            continue
        log(f"{numbered[unit]}/{len(numbered)} - {video.path}" + (f" {span} of {planned}" if planned > 1 else ""))
        for record in process_unit(unit, paths, segmenter, how, plan, done, on_window):
            done[record["window"]] = record
    try:
        return assemble_if_ready(video, paths, how.settings, planned, announce=True)
    except BrokenWindows as error:
        if segmenter is None:  # this job loaded no model: the next run computes them
            raise
        broken = error.problems
    # Windows whose files were not as recorded, dropped by now: computed again here, once.
    done = {window: record for window, record in done.items() if window not in broken}
    for unit in units_of(video, plan, how.settings.chunk_frames):
        if any(unit.first <= window and (unit.last is None or window <= unit.last) for window in broken):
            log(f"again {video.path} window {unit.first}: its files were not as recorded")
            for record in process_unit(unit, paths, segmenter, how, plan, done, on_window):
                done[record["window"]] = record
    return assemble_if_ready(video, paths, how.settings, planned, announce=True)


def assemble_if_ready(
    video: Video, paths: dict[str, Path], settings: RunSettings, planned: int, announce: bool
) -> dict[str, Any] | None:
    """Assemble a video whose windows are all there and return its metadata; None while windows
    of other shares are still to come (said in the log when `announce`). BrokenWindows for
    windows whose files are not as recorded (`assembly.assemble` has dropped them)."""
    records = done_windows(paths["folder"], recipe(video, settings))
    windows = complete_run(records)
    if windows is None:
        if announce:
            missing = ", ".join(map(str, sorted(set(range(planned)) - set(records))))
            log(f"wait {video.path}: windows {missing} of {planned} still to come from other shares")
        return None
    try:
        return finish_video(video, paths, windows)
    except BrokenWindows as error:
        log(f"warning: {video.path}: {error}")
        raise


class ShareWork:
    """A job's work on the videos of its share, video by video: each failure is recorded where a
    user and the progress command look (the video's error record, the log, the job's account),
    and fails that video alone."""

    def __init__(self, job: JobLog, paths_of: dict[Video, dict[str, Path]]) -> None:
        self.job, self.paths_of = job, paths_of
        self.failures: list[str] = []

    def fail(self, video: Video, error: BaseException) -> None:
        self.failures.append(record_failure(video, self.paths_of[video], error))
        log(f"FAILED {self.failures[-1]}")
        self.job.failed(video.key, self.failures[-1])

    def windows_done(
        self, videos: Sequence[Video], settings: RunSettings, overwrite: bool
    ) -> dict[Video, dict[int, dict[str, Any]]]:
        """Each video's windows computed before with these settings ({} with `overwrite`); a
        video whose file is gone fails here, before the slow model load."""
        done: dict[Video, dict[int, dict[str, Any]]] = {}
        for video in videos:
            paths = self.paths_of[video]
            if video.size is None:
                with contextlib.suppress(OSError):  # it fails either way; the error record says why
                    start_redo(paths)
                self.fail(video, VideoError(f"{video.path}: no such file"))
                continue
            done[video] = {} if overwrite else done_windows(paths["folder"], recipe(video, settings))
        return done

    def compute(
        self,
        units: Sequence[Unit],
        pending: Sequence[Unit],
        found: Triage,
        done: dict[Video, dict[int, dict[str, Any]]],
        segmenter: Segmenter | None,
        how: Computation,
    ) -> tuple[list[Video], list[Video]]:
        """Compute the `pending` units of each video in `units` and assemble it if it can be;
        a video another job completed meanwhile is skipped. Returns the videos complete and those
        waiting for other shares' windows."""
        complete: list[Video] = []
        waiting: list[Video] = []
        numbered = {unit: number for number, unit in enumerate(pending, start=1)}
        for video, group in itertools.groupby(units, key=lambda unit: unit.video):
            if video not in done:
                continue
            paths = self.paths_of[video]
            outdated = video in found.outdated
            try:
                metadata = finished_meanwhile(video, paths, found.seen[video], outdated, how.share.bucket_lag)
                if metadata is not None:
                    log(f"skip {video.path}: completed by another job since this one started")
                else:
                    plan = found.plans[video]
                    metadata = compute_video(list(group), paths, segmenter, how, plan, done[video], numbered, self.job)
            except Exception as error:  # one bad video (or one failed write) never stops the others
                self.fail(video, error)
                continue
            if metadata is not None:
                complete.append(video)
                self.job.completed(video.key)
            else:
                waiting.append(video)
        return complete, waiting

    def end(self, videos: int, complete: Sequence[Video], waiting: Sequence[Video]) -> int:
        """Log how the share ended, close the job's account; returns the exit status."""
        counts = f"{len(complete)} of {videos} videos complete, {len(self.failures)} failed"
        log(counts + (f", {len(waiting)} waiting for windows of other shares" if waiting else ""))
        for message in self.failures:
            log(f"  failed: {message}")
        status = 1 if self.failures else 0
        self.job.state(ENDED, status)
        return status


def log_computed(
    done: dict[Video, dict[int, dict[str, Any]]], before: dict[Video, set[int]], device: torch.device
) -> None:
    """One line: the windows this job computed (those not `before`), their frames and seconds."""
    computed = [
        record for video, records in done.items() for window, record in records.items() if window not in before[video]
    ]
    if computed:
        frames = sum(record["frames"] for record in computed)
        seconds = sum(record["seconds"] for record in computed)
        per_frame = f": {seconds / frames:.2f} s per sampled frame" if frames else ""
        count = len(computed)
        log(
            f"computed {count} window{'s' * (count != 1)}, {frames} sampled frames in {seconds:.1f} s "
            f"on {device}{per_frame}"
        )
