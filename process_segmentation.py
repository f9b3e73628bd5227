"""Track every object that matches a few text prompts through videos with SAM3.

Each video has a key: its path inside the folder it was found in, without the extension
("train/10001/en"), or the file name without the extension for a video given as a file. For each
video this writes, under OUTPUT_DIR/<key>/, with <name> the key's last part ("en"):
  <name>_segmented.mp4   H.264 (yuv420p, faststart) with each object's mask, box and prompt drawn
  <name>_tracks.jsonl    per frame: each object's ID, prompt, score, box and COCO RLE mask
  <name>_mot.txt         the boxes in MOTChallenge format
  <name>_preview.jpg     a contact sheet of six overlay frames
  <name>_metadata.json   what was processed and found; written last, so its presence means "complete"
  <name>_error.json      only when the video failed: one line saying why
  windows/               each window's results, kept as it is done; the files above are assembled from them
and OUTPUT_DIR/.jobs/ holds the launch's plan and each job's account, rewritten after each window
(`python3 -m sam3_pipeline.progress OUTPUT_DIR` shows how far the jobs have got).

A window is up to --chunk-frames sampled frames tracked by one SAM3 session; it is the unit of
work. A rerun computes only the windows a killed run had not finished, and --shard-index /
--num-shards split the windows of all videos, so jobs share a long video.

Usage:
  python process_segmentation.py match.mp4
  python process_segmentation.py videos/ other.mov --prompts "soccer player" ball --sample-fps 2
  python process_segmentation.py /data/videos --shard-index 3 --num-shards 10   # this job's share of the windows
  python process_segmentation.py --summarize OUTPUT_DIR [videos/]               # done / partial / failed / missing

Frames stream through: a decode thread, SAM3 in the main thread and the outputs in a forked process
work side by side, a few frames apart (--serial: one after another). The model is loaded once per run.
With --num-shards > 1 a job waits --bucket-lag seconds at its end for other jobs' last windows
(docs/pool-bucket.md). Exit status: 0 when every video is complete, 1 when any video failed (or a
video could not be read to plan the shares), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import itertools
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Container, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
from tqdm import tqdm

from sam3_pipeline.assembly import assemble_and_record
from sam3_pipeline.dataset import Unit, Video, assign_units, collect_videos
from sam3_pipeline.device import (
    choose_device,
    choose_dtype,
    describe_device,
    dtype_name,
    leave_a_core_free,
)
from sam3_pipeline.files import now_iso, read_record, write_json
from sam3_pipeline.messages import UsageError, VideoError, log, one_line, redact
from sam3_pipeline.options import parse_args
from sam3_pipeline.outputs import (
    check_output_dir,
    completed_metadata,
    output_paths,
    output_problems,
    remove_dead_scratch,
    remove_stale_partials,
    source_change,
    written_within,
)
from sam3_pipeline.progress import ENDED, JOBS_FOLDER, WAITING, JobLog, launch_plan
from sam3_pipeline.sam3 import (
    ModelFrame,
    Segmenter,
    check_prompts,
    load_segmenter,
    model_frames,
    prepare_frames,
    shared_position,
)
from sam3_pipeline.stages import ChildProcess, RunAhead, StageTimes
from sam3_pipeline.summary import summarize
from sam3_pipeline.unit_outputs import WindowBound, draw_and_record, unit_items
from sam3_pipeline.video_io import (
    DecodeReport,
    VideoInfo,
    display_rotation,
    output_rate,
    position_rate,
    read_video_info,
    sample_frames,
    seekable,
)
from sam3_pipeline.windows import (
    WINDOWS_FOLDER,
    BrokenWindows,
    complete_run,
    computed_by,
    done_windows,
    plan_units,
    planned_frames,
    unit_done,
    window_count,
)

# Frames waiting between two stages: enough to ride out one slow frame, few enough that memory
# stays flat (a 720p frame with SAM3's input is ~15 MB; its 20 objects' logits ~7 MB).
STAGE_QUEUE_DEPTH = 4
# A video that the system fails to read (a bucket mount's I/O error) is tried again 0.5, 1, 2 and 4 s later.
PROBE_ATTEMPTS, PROBE_RETRY_SECONDS = 5, 0.5
POLL_SECONDS = 5.0  # how often a job that waits for other jobs' windows looks again
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class PlanError(Exception):
    """A video this job cannot read where other jobs may: it cannot make the split they make."""


def recipe(video: Video, args: argparse.Namespace) -> dict[str, Any]:
    """What a window's results depend on: windows computed otherwise are not reused."""
    return {"source_name": video.path.name, "source_bytes": video.size, **settings(args)}


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What every window of a run is computed with, whatever its video."""
    return {
        "prompts": list(args.prompts),
        "sample_fps": str(args.sample_fps),
        "max_frames": args.max_frames,
        "chunk_frames": args.chunk_frames,
        "model": args.model,
        "tracks": args.tracks,
    }


def expected_positions(info: VideoInfo, args: argparse.Namespace) -> int | None:
    """How many sampling grid positions the container's duration spans (at most --max-frames)."""
    if not info.duration:
        return args.max_frames or None
    positions = math.ceil(info.duration * position_rate(args.sample_fps, info.fps))
    return min(positions, args.max_frames) if args.max_frames else positions


def plan_video(video: Video, args: argparse.Namespace) -> dict[str, Any] | None:
    """What a video's windows are planned from, read from its container: {"positions": grid
    positions its duration spans (None when it states none), "seekable": `seekable`}; None where
    the file itself cannot be read as a video (every job reads the same bytes and plans it alike:
    one unit, which fails with the reason when it is computed).

    Every job plans every video to make the same split, so an error of the system rather than of
    the file (OSError: a bucket mount's I/O error, a file the listing showed but the read did not
    find), which may hit one worker only, is tried again, then raises PlanError."""
    for attempt in range(1, PROBE_ATTEMPTS + 1):
        try:
            with av.open(str(video.path)) as container:
                info = read_video_info(container, video.path)
                return {"positions": expected_positions(info, args), "seekable": seekable(container)}
        except VideoError:
            return None
        except OSError as error:  # before FFmpegError: PyAV's errno errors are both
            if attempt == PROBE_ATTEMPTS:
                waited = PROBE_RETRY_SECONDS * (2 ** (PROBE_ATTEMPTS - 1) - 1)
                raise PlanError(f"{video.path}: {one_line(error)} ({PROBE_ATTEMPTS} reads over {waited:g} s)") from None
            time.sleep(PROBE_RETRY_SECONDS * 2 ** (attempt - 1))
        except av.FFmpegError:
            return None
    return None


def units_of(video: Video, plan: dict[str, Any] | None, args: argparse.Namespace) -> list[Unit]:
    """A video's units of work (`windows.plan_units`), each weighed by the sampled frames it is
    expected to hold. Without a plan, one unit."""
    if plan is None:
        return [Unit(video, 0, None, args.chunk_frames)]
    frames = planned_frames(plan["positions"], args.chunk_frames)
    units = plan_units(len(frames), plan["seekable"])
    return [Unit(video, first, last, sum(frames[first : None if last is None else last + 1])) for first, last in units]


def unit_facts(
    video: Video,
    info: VideoInfo,
    report: DecodeReport,
    size: tuple[int, int],
    fps_out: Fraction,
    args: argparse.Namespace,
    segmenter: Segmenter,
    plan: dict[str, Any] | None,
) -> dict[str, Any]:
    """What every window record of the video carries: the recipe, the plan its windows follow
    (`plan_video`), the video as the metadata describes it, how and by whom it was computed."""
    rotation, mirrored = display_rotation(report.transform)
    geometry = report.geometry
    return {
        "recipe": recipe(video, args),
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
            "sample_fps": float(args.sample_fps),
            "output_fps": float(fps_out),
            "max_frames": args.max_frames,
            "frames_expected": (
                min(math.ceil(info.duration * fps_out), args.max_frames or math.inf) if info.duration else None
            ),
        },
        "device": str(segmenter.device),
        "dtype": dtype_name(segmenter.dtype),
        "postprocessing": segmenter.postprocessing,
        "pipeline": "serial" if args.serial else "overlapped",
        "computed_by": computed_by(args.shard_index, args.num_shards),
        "seeked": report.seeked,
    }


def process_unit(
    unit: Unit,
    paths: dict[str, Path],
    segmenter: Segmenter,
    args: argparse.Namespace,
    plan: dict[str, Any] | None,
    skip: Container[int],
    on_window: Callable[[int, int, float], None],
) -> list[dict[str, Any]]:
    """Compute a unit's windows (those not in `skip`): decode -> SAM3 -> masks, overlay, H.264 and
    tracks, frame by frame, the stages side by side (unless --serial). Each window's results are
    in place as soon as it is done; returns their records. on_window(window, sampled frames,
    seconds): called as SAM3 finishes each window, with the time since the one before (or since
    the unit began)."""
    started = time.monotonic()
    source = unit.video.path
    chunk = args.chunk_frames
    try:
        container = av.open(str(source))
    except (av.FFmpegError, OSError) as error:
        raise VideoError(f"{source}: not a readable video: {one_line(error)}") from None

    paths["folder"].mkdir(parents=True, exist_ok=True)
    report = DecodeReport()
    with container:
        info = read_video_info(container, source)
        fps_out = output_rate(args.sample_fps, info.fps)
        times = StageTimes()
        after = shared_position(unit.first, chunk) if unit.first else None
        bound = WindowBound(sample_frames(container, args.sample_fps, args.max_frames, report, after), unit.last, chunk)
        frames = times.iterate("decode", bound)
        try:
            first = next(frames, None)
        except av.FFmpegError as error:
            raise VideoError(f"{source}: cannot decode: {one_line(error)}") from None
        if first is None:
            raise VideoError(f"{source}: no frames could be decoded")
        size = first.rgb.shape[:2]  # as displayed: (H, W) after the display matrix
        facts = unit_facts(unit.video, info, report, size, fps_out, args, segmenter, plan)
        rate = position_rate(args.sample_fps, info.fps)
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
            finish = (paths["folder"], size, fps_out, args.tracks, unit.first, skip, facts, started)
            if args.serial:
                prepared = prepare_frames(segmenter, samples, times)
            else:  # the outputs process is forked first, before this process starts a thread
                outputs_process = stack.enter_context(ChildProcess(draw_and_record, finish, STAGE_QUEUE_DEPTH))
                prepared = stack.enter_context(
                    RunAhead(prepare_frames(segmenter, samples, times), STAGE_QUEUE_DEPTH, "decode")
                )
            outputs = counted(model_frames(segmenter, prepared, args.prompts, chunk, times, unit.first, skip))
            items = unit_items(outputs, times, report, bound)
            return draw_and_record(items, *finish) if args.serial else outputs_process.run(items)


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


def check_device(args: argparse.Namespace) -> int:
    """--check-device: say what a run would compute on, or fail the way a run would."""
    device = choose_device(args.device)
    print(describe_device(device, choose_dtype(args.dtype, device)))
    return EXIT_OK


def describe_units(units: Sequence[Unit], planned: dict[Video, int]) -> str:
    """`x/match (windows 0, 2-3 of 6), clip`: a shard's units by video; a video of one window by its key."""
    parts = []
    for video, group in itertools.groupby(units, key=lambda unit: unit.video):
        if planned[video] == 1:
            parts.append(video.key)
            continue
        runs = consecutive([unit.first for unit in group])
        spans = [f"{run[0]}-{run[-1]}" if len(run) > 1 else f"{run[0]}" for run in runs]
        parts.append(f"{video.key} (windows {', '.join(spans)} of {planned[video]})")
    return ", ".join(parts)


def consecutive(numbers: Sequence[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][-1] + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    return runs


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


@dataclasses.dataclass
class Triage:
    """What a job found of each video before its work: those to work on, the metadata it saw
    (`seen`: {} for none), the metadata a redo replaces on purpose (`outdated`: --overwrite, or
    results made from another file), and every video's plan (`plan_video`)."""

    todo: list[Video]
    seen: dict[Video, dict[str, Any]]
    outdated: set[Video]
    plans: dict[Video, dict[str, Any] | None]


def usable(
    metadata: dict[str, Any], video: Video, folder: Path, bucket_lag: float, problems: list[str] | None = None
) -> bool:
    """Whether a video's metadata stands for its results: complete, made from this file, and its
    files whole here, or still arriving (written less than `bucket_lag` ago: another worker's
    upload, seen late, not a loss). problems: its `output_problems`, where already known."""
    if metadata.get("status") != "complete" or source_change(metadata, video):
        return False
    if problems is None:
        problems = output_problems(folder, metadata)
    return not problems or written_within(metadata, bucket_lag)


def triage(videos: Sequence[Video], paths_of: dict[Video, dict[str, Path]], args: argparse.Namespace) -> Triage:
    """Sort the videos into those to work on (not complete; complete but not whole; made from
    another file; all with --overwrite) and the rest, and plan every video. Every job plans every
    video, complete or not, so that all make the same split whatever they find done: a complete
    video from its metadata, the others from their containers (PlanError where one cannot be
    read)."""
    found = Triage([], {}, set(), {})
    for video in videos:
        paths = paths_of[video]
        metadata = read_record(paths["metadata"])
        found.seen[video] = metadata
        complete = metadata.get("status") == "complete"
        problems = output_problems(paths["folder"], metadata) if complete else []
        if not args.overwrite and usable(metadata, video, paths["folder"], args.bucket_lag, problems):
            if problems:
                log(f"note: {video.path}: complete at {metadata['completed_at']}, {problems[0]} here yet: still arriving")
            found.plans[video] = metadata.get("plan")
            continue
        if complete:
            if change := source_change(metadata, video):
                log(f"redo {video.path}: the results in {paths['folder']} were {change}")
            elif not args.overwrite:
                log(f"redo {video.path}: its results in {paths['folder']} are not whole: {'; '.join(problems)}")
            if args.overwrite or change:
                found.outdated.add(video)
        found.todo.append(video)
        try:
            found.plans[video] = plan_video(video, args)
        except PlanError:
            if args.num_shards > 1:
                raise
            found.plans[video] = None  # alone, the split does not matter: it fails with the reason when computed
    return found


def compute_video(
    units: Sequence[Unit],
    paths: dict[str, Path],
    segmenter: Segmenter | None,
    args: argparse.Namespace,
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
    planned = window_count(plan and plan["positions"], args.chunk_frames)
    for unit in units:
        whole = unit.last is None and unit.first < planned - 1  # a video read from the start
        span = f"windows {unit.first}-{planned - 1}" if whole else f"window {unit.first}"
        if unit not in numbered:
            log(f"skip {video.path} {span}: computed before")
            continue
        log(f"{numbered[unit]}/{len(numbered)} - {video.path}" + (f" {span} of {planned}" if planned > 1 else ""))
        for record in process_unit(unit, paths, segmenter, args, plan, done, on_window):
            done[record["window"]] = record
    try:
        return assemble_if_ready(video, paths, args, planned, announce=True)
    except BrokenWindows as error:
        if segmenter is None:  # this job loaded no model: the next run computes them
            raise
        broken = error.problems
    # Windows whose files were not as recorded, dropped by now: computed again here, once.
    done = {window: record for window, record in done.items() if window not in broken}
    for unit in units_of(video, plan, args):
        if any(unit.first <= window and (unit.last is None or window <= unit.last) for window in broken):
            log(f"again {video.path} window {unit.first}: its files were not as recorded")
            for record in process_unit(unit, paths, segmenter, args, plan, done, on_window):
                done[record["window"]] = record
    return assemble_if_ready(video, paths, args, planned, announce=True)


def assemble_if_ready(
    video: Video, paths: dict[str, Path], args: argparse.Namespace, planned: int, announce: bool
) -> dict[str, Any] | None:
    """Assemble a video whose windows are all there and return its metadata; None while windows
    of other shares are still to come (said in the log when `announce`). BrokenWindows for
    windows whose files are not as recorded (`assembly.assemble` has dropped them)."""
    records = done_windows(paths["folder"], recipe(video, args))
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


def wait_for_other_shares(
    waiting: Sequence[Video],
    todo: Sequence[Video],
    paths_of: dict[Video, dict[str, Path]],
    args: argparse.Namespace,
    fail: Callable[[Video, BaseException], None],
) -> tuple[list[Video], list[Video]]:
    """At the end of a job's share (--num-shards > 1): wait --bucket-lag seconds, as long as the
    bucket may take to show this worker what other jobs wrote before this one ended, and assemble
    the `waiting` videos whose last windows that brings. Whichever job of a launch ends last has
    then seen every other job's windows, so its assembly and the summary after it leave no video
    unassembled and say so, however close together the jobs ended. The wait ends early when every
    video of `todo` (those that were not complete) is complete here: nothing more can come.
    Returns the videos complete and those still waiting; `fail` records each that failed."""
    started = time.monotonic()
    assembled: list[Video] = []
    left = list(waiting)
    unfinished = collections.deque(todo)  # checked in order, each until it is complete: a poll stops at the first that is not
    log(f"wait up to {args.bucket_lag:g} s for windows of other jobs (the bucket shows them late): {len(left)} videos")
    while True:
        for video in list(left):
            paths = paths_of[video]
            try:
                metadata = read_record(paths["metadata"])
                if usable(metadata, video, paths["folder"], args.bucket_lag) or assemble_if_ready(
                    video, paths, args, 0, announce=False
                ):
                    left.remove(video)
                    assembled.append(video)
            except Exception as error:  # one video's trouble never stops the others
                left.remove(video)
                fail(video, error)
        while unfinished and completed_metadata(paths_of[unfinished[0]]):
            unfinished.popleft()
        remaining = started + args.bucket_lag - time.monotonic()
        if remaining <= 0 or not unfinished:
            break
        time.sleep(min(POLL_SECONDS, remaining))
    still = f", {len(left)} still waiting for jobs that are running" if left else ""
    log(f"waited {time.monotonic() - started:.1f} s (GPU idle): {len(assembled)} videos complete{still}")
    return assembled, left


def planned_windows(
    units: Sequence[Unit], shards: Sequence[int], plans: dict[Video, dict[str, Any] | None], chunk_frames: int
) -> dict[str, list[tuple[int, int]]]:
    """Per video key, each window's planned sampled frames and the shard that computes it (`shards`:
    each unit's, as `assign_units` gives them), in window order."""
    windows: dict[str, list[tuple[int, int]]] = {}
    for unit, shard in zip(units, shards, strict=True):
        plan = plans[unit.video]
        frames = planned_frames(plan and plan["positions"], chunk_frames)
        last = len(frames) - 1 if unit.last is None else unit.last
        windows.setdefault(unit.video.key, []).extend((frames[window], shard) for window in range(unit.first, last + 1))
    return windows


def unit_windows(unit: Unit, planned: int) -> range:
    """The windows of a unit, of a video planned as `planned` windows."""
    return range(unit.first, planned if unit.last is None else unit.last + 1)


def run(args: argparse.Namespace) -> int:
    started = time.time()
    # Before anything else: a worker that cannot see its GPU must fail now, not crawl for hours.
    device = choose_device(args.device)
    dtype = choose_dtype(args.dtype, device)
    videos = collect_videos(args.inputs, args.output_dir)
    paths_of = {video: output_paths(args.output_dir, video.key) for video in videos}
    try:
        found = triage(videos, paths_of, args)
    except PlanError as error:  # a guess at the video's windows would move other videos' windows between jobs
        log(
            f"error: cannot read {error}; every job reads every video to make the same split, so this job "
            "computes nothing and exits 1, to be retried (SkyPilot's job_recovery)"
        )
        return EXIT_FAILED
    todo, plans = found.todo, found.plans
    every_unit = [unit for video in videos for unit in units_of(video, plans[video], args)]
    shards = assign_units(every_unit, args.num_shards)
    share = [unit for unit, shard in zip(every_unit, shards, strict=True) if shard == args.shard_index]
    planned = {video: window_count(plan and plan["positions"], args.chunk_frames) for video, plan in plans.items()}
    for video in dict.fromkeys(unit.video for unit in share if unit.video not in todo):  # this job's share only
        log(f"skip {video.path}: complete in {paths_of[video]['folder']} (--overwrite to redo)")
    units = [unit for unit in share if unit.video in todo]
    if args.num_shards > 1:
        count = len({unit.video for unit in units})
        windows = sum(len(unit_windows(unit, planned[unit.video])) for unit in units)
        frames = sum(unit.weight for unit in units)
        log(
            f"shard {args.shard_index}/{args.num_shards}: {count} video{'s' * (count != 1)}, "
            f"{windows} window{'s' * (windows != 1)}, ~{frames} sampled frames: "
            f"{describe_units(units, planned)}"
        )
    check_output_dir(args.output_dir)
    complete_before = [video.key for video in videos if video not in todo]
    windows_planned = planned_windows(every_unit, shards, plans, args.chunk_frames)
    launch = {**settings(args), "overwrite": args.overwrite}  # a redo on purpose is another plan
    plan = launch_plan(windows_planned, complete_before, args.num_shards, launch)
    job = JobLog(args.output_dir, plan, args.shard_index, str(device), log)
    for unit in share:
        if unit.video not in todo:
            job.done_before(unit.video.key, unit_windows(unit, planned[unit.video]))
    with job:  # an error that ends the run ends the job's account too
        if not units:
            log("nothing to do: " + ("this shard has no videos" if args.num_shards > 1 else "every video is complete"))
            if args.num_shards > 1 and args.bucket_lag > 0 and todo:  # its summary must not miss the others' work
                job.state(WAITING)
                wait_for_other_shares([], todo, paths_of, args, lambda video, error: None)
            job.state(ENDED, EXIT_OK)
            return EXIT_OK
        mine = list(dict.fromkeys(unit.video for unit in units))
        folders = [args.output_dir, *(paths_of[video]["folder"] for video in mine)]
        folders += [folder / WINDOWS_FOLDER for folder in folders[1:]] + [args.output_dir / JOBS_FOLDER]
        leftovers = remove_stale_partials(folders, started) + remove_dead_scratch()
        if leftovers:
            log(f"removed {len(leftovers)} leftovers of killed runs: {', '.join(map(str, leftovers))}")

        failures: list[str] = []

        def fail(video: Video, error: BaseException) -> None:
            """Record a video's failure (its error record, the log, the job's account): it fails alone."""
            failures.append(record_failure(video, paths_of[video], error))
            log(f"FAILED {failures[-1]}")
            job.failed(video.key, failures[-1])

        done: dict[Video, dict[int, dict[str, Any]]] = {}
        for video in mine:
            paths = paths_of[video]
            if video.size is None:  # fail it before the slow model load
                with contextlib.suppress(OSError):  # it fails either way; the error record says why
                    start_redo(paths)
                fail(video, VideoError(f"{video.path}: no such file"))
                continue
            done[video] = {} if args.overwrite else done_windows(paths["folder"], recipe(video, args))
        for unit in units:
            if unit.video in done:
                job.done_before(unit.video.key, set(unit_windows(unit, planned[unit.video])) & done[unit.video].keys())
        job.save()
        pending = [
            unit for unit in units if unit.video in done and not unit_done(done[unit.video], unit.first, unit.last)
        ]
        segmenter = None
        if pending:
            leave_a_core_free(device)
            segmenter = load_segmenter(args.model, device, dtype, args.model_step)
            check_prompts(segmenter.processor, args.prompts)
            log(
                f"model {args.model}, prompts {args.prompts}, SAM3 post-processing: {segmenter.postprocessing}, "
                f"step per frame: {segmenter.model_step}"
            )
            log(describe_device(device, dtype))

        complete: list[Video] = []
        waiting: list[Video] = []
        numbered = {unit: number for number, unit in enumerate(pending, start=1)}
        before = {video: set(records) for video, records in done.items()}
        for video, group in itertools.groupby(units, key=lambda unit: unit.video):
            if video not in done:
                continue
            paths = paths_of[video]
            try:
                metadata = finished_meanwhile(video, paths, found.seen[video], video in found.outdated, args.bucket_lag)
                if metadata is not None:
                    log(f"skip {video.path}: completed by another job since this one started")
                else:
                    metadata = compute_video(
                        list(group), paths, segmenter, args, plans[video], done[video], numbered, job
                    )
            except Exception as error:  # one bad video (or one failed write) never stops the others
                fail(video, error)
                continue
            if metadata is not None:
                complete.append(video)
                job.completed(video.key)
            else:
                waiting.append(video)
        if args.num_shards > 1 and args.bucket_lag > 0:
            job.state(WAITING)
            assembled, waiting = wait_for_other_shares(waiting, todo, paths_of, args, fail)
            complete += assembled
            for video in assembled:
                job.completed(video.key)
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
        counts = f"{len(complete)} of {len(mine)} videos complete, {len(failures)} failed"
        log(counts + (f", {len(waiting)} waiting for windows of other shares" if waiting else ""))
        for message in failures:
            log(f"  failed: {message}")
        status = EXIT_FAILED if failures else EXIT_OK
        job.state(ENDED, status)
        return status


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Let `sky jobs cancel` and preemption notices unwind through the cleanup code.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        if args.check_device:
            return check_device(args)
        if args.summarize is not None:
            summarize(args.summarize, args.inputs)
            return EXIT_OK
        return run(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # whoever read the output stopped early (`--summarize DIR | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush is quiet
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    raise SystemExit(main())
