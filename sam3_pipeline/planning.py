"""A launch's plan: what each video's windows are expected to hold, how they are split into shares,
and what a job finds done before it starts (triage)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import av

from sam3_pipeline.dataset import Unit, Video, assign_units
from sam3_pipeline.files import read_record
from sam3_pipeline.messages import VideoError, log, one_line
from sam3_pipeline.options import RunSettings, Share
from sam3_pipeline.outputs import output_problems, source_change, written_within
from sam3_pipeline.progress import launch_plan
from sam3_pipeline.video_io import VideoInfo, position_rate, read_video_info, seekable
from sam3_pipeline.windows import plan_units, planned_frames, window_count

# A video that the system fails to read (a bucket mount's I/O error) is tried again 0.5, 1, 2 and 4 s later.
PROBE_ATTEMPTS, PROBE_RETRY_SECONDS = 5, 0.5


class PlanError(Exception):
    """A video this job cannot read where other jobs may: it cannot make the split they make."""


def recipe(video: Video, settings: RunSettings) -> dict[str, Any]:
    """What a window's results depend on: windows computed otherwise are not reused."""
    return {"source_name": video.path.name, "source_bytes": video.size, **settings.record()}


def expected_positions(info: VideoInfo, settings: RunSettings) -> int | None:
    """How many sampling grid positions the container's duration spans (at most --max-frames)."""
    if not info.duration:
        return settings.max_frames or None
    positions = math.ceil(info.duration * position_rate(settings.sample_fps, info.fps))
    return min(positions, settings.max_frames) if settings.max_frames else positions


def plan_video(video: Video, settings: RunSettings) -> dict[str, Any] | None:
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
                return {"positions": expected_positions(info, settings), "seekable": seekable(container)}
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


def units_of(video: Video, plan: dict[str, Any] | None, chunk_frames: int) -> list[Unit]:
    """A video's units of work (`windows.plan_units`), each weighed by the sampled frames it is
    expected to hold. Without a plan, one unit."""
    if plan is None:
        return [Unit(video, 0, None, chunk_frames)]
    frames = planned_frames(plan["positions"], chunk_frames)
    units = plan_units(len(frames), plan["seekable"])
    return [Unit(video, first, last, sum(frames[first : None if last is None else last + 1])) for first, last in units]


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


def triage(
    videos: Sequence[Video],
    paths_of: dict[Video, dict[str, Path]],
    settings: RunSettings,
    share: Share,
    overwrite: bool,
) -> Triage:
    """Sort the videos into those to work on (not complete; complete but not whole; made from
    another file; all with `overwrite`) and the rest, and plan every video. Every job plans every
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
        if not overwrite and usable(metadata, video, paths["folder"], share.bucket_lag, problems):
            if problems:
                log(f"note: {video.path}: complete at {metadata['completed_at']}, {problems[0]} here yet: still arriving")
            found.plans[video] = metadata.get("plan")
            continue
        if complete:
            if change := source_change(metadata, video):
                log(f"redo {video.path}: the results in {paths['folder']} were {change}")
            elif not overwrite:
                log(f"redo {video.path}: its results in {paths['folder']} are not whole: {'; '.join(problems)}")
            if overwrite or change:
                found.outdated.add(video)
        found.todo.append(video)
        try:
            found.plans[video] = plan_video(video, settings)
        except PlanError:
            if share.count > 1:
                raise
            found.plans[video] = None  # alone, the split does not matter: it fails with the reason when computed
    return found


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


@dataclasses.dataclass
class Launch:
    """What a job plans before its work, the same in every job of the launch but for `mine` and
    `units`: `found` (triage), every video's units and the share of each (`assign_units`), this
    job's units (`mine`, complete videos' included), those of the videos it works on (`units`),
    and each video's planned window count."""

    found: Triage
    every_unit: list[Unit]
    shards: list[int]
    mine: list[Unit]
    units: list[Unit]
    planned: dict[Video, int]


def plan_launch(
    videos: Sequence[Video],
    paths_of: dict[Video, dict[str, Path]],
    settings: RunSettings,
    share: Share,
    overwrite: bool,
) -> Launch:
    """Triage and plan every video, split all their windows into shares and take this job's;
    the log says which of its videos are complete and, for a job of several, its share.
    PlanError where a video cannot be read to plan it (`triage`)."""
    found = triage(videos, paths_of, settings, share, overwrite)
    every_unit = [unit for video in videos for unit in units_of(video, found.plans[video], settings.chunk_frames)]
    shards = assign_units(every_unit, share.count)
    mine = [unit for unit, shard in zip(every_unit, shards, strict=True) if shard == share.index]
    planned = {
        video: window_count(plan and plan["positions"], settings.chunk_frames) for video, plan in found.plans.items()
    }
    for video in dict.fromkeys(unit.video for unit in mine if unit.video not in found.todo):
        log(f"skip {video.path}: complete in {paths_of[video]['folder']} (--overwrite to redo)")
    units = [unit for unit in mine if unit.video in found.todo]
    if share.count > 1:
        count = len({unit.video for unit in units})
        windows = sum(len(unit_windows(unit, planned[unit.video])) for unit in units)
        frames = sum(unit.weight for unit in units)
        log(
            f"shard {share.index}/{share.count}: {count} video{'s' * (count != 1)}, "
            f"{windows} window{'s' * (windows != 1)}, ~{frames} sampled frames: "
            f"{describe_units(units, planned)}"
        )
    return Launch(found, every_unit, shards, mine, units, planned)


def launch_record(
    launch: Launch, videos: Sequence[Video], settings: RunSettings, share: Share, overwrite: bool
) -> dict[str, Any]:
    """The launch's plan as the jobs' accounts keep it (`progress.launch_plan`): every job of the
    launch writes the same one."""
    complete_before = [video.key for video in videos if video not in launch.found.todo]
    windows = planned_windows(launch.every_unit, launch.shards, launch.found.plans, settings.chunk_frames)
    # a redo on purpose is another plan
    return launch_plan(windows, complete_before, share.count, {**settings.record(), "overwrite": overwrite})
