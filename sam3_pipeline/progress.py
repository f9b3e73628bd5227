"""How far the jobs filling an output folder have got, from the few small files they keep in
OUTPUT_DIR/.jobs/, and the command that shows it: `python3 -m sam3_pipeline.progress OUTPUT_DIR`.

Every job of a launch plans every video the same way and makes the same split of their windows
(`process_segmentation.triage`, `dataset.assign_units`), so each writes the same plan; each also
keeps its own account:

  .jobs/plan.json                the plan: per video, the sampled frames each window is expected
                                 to hold and the job (shard) that computes it, and the videos
                                 already complete (as the last job to start found them)
  .jobs/shard-0003-of-0010.json  job 3's account: when it started (and how often, for this plan),
                                 the windows of its share done before it, each window it computed
                                 with its sampled frames and seconds, the videos it completed and
                                 those that failed, its state; rewritten after each window, so
                                 its time says when the job was last heard from

The report reads those 1 + N files (N jobs) whatever the number of windows, and nothing else: a
laptop copies `.jobs/` from the bucket (a few hundred kB) and reads it there. Window records,
which carry masks, and the videos' metadata are not read.

Standard library only (no PyTorch, no PyAV): it runs on any Python 3.10+ beside a copy of this
folder. What the jobs write here is for people to watch; no result depends on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import socket
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from sam3_pipeline.files import now_iso, read_record, write_json

JOBS_FOLDER = ".jobs"
PLAN_NAME = "plan.json"
RUNNING, WAITING, ENDED = "running", "waiting", "ended"  # a job's states; WAITING: for other jobs' windows


def shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:04d}-of-{num_shards:04d}.json"


def launch_plan(
    windows: dict[str, list[tuple[int, int]]], complete: Iterable[str], num_shards: int, settings: dict[str, Any]
) -> dict[str, Any]:
    """The plan of a launch, as plan.json holds it.

    windows: per video key, each window's (planned sampled frames, shard), in window order;
    complete: the keys of videos complete before the launch's work; settings: what the windows
    are computed with (prompts, rate, window size, model). Its `plan_id` is the same for every job
    that makes the same plan, whatever each found complete."""
    videos = {
        key: {"frames": [frames for frames, _ in planned], "shards": [shard for _, shard in planned]}
        for key, planned in windows.items()
    }
    identity = json.dumps({"num_shards": num_shards, "settings": settings, "videos": videos}, sort_keys=True)
    return {
        "plan_id": hashlib.sha256(identity.encode()).hexdigest()[:12],
        "num_shards": num_shards,
        "settings": settings,
        "written_at": now_iso(),
        "complete": sorted(set(complete) & videos.keys()),
        "videos": videos,
    }


class JobLog:
    """This job's account in OUTPUT_DIR/.jobs/ (see the module's docstring), rewritten whole at each
    change. A write that fails (a bucket mount's hiccup) is reported through `warn` once and never
    stops the job: its results do not depend on the account.

    A job started again with the same plan (SkyPilot's recovery, or a relaunch) keeps the windows
    its earlier runs computed and counts its starts."""

    def __init__(
        self, output_dir: Path, plan: dict[str, Any], shard: int, device: str, warn: Callable[[str], None]
    ) -> None:
        self.path = output_dir / JOBS_FOLDER / shard_name(shard, plan["num_shards"])
        self.warn = warn
        self.failing = False
        earlier = read_record(self.path)
        same = earlier.get("plan_id") == plan["plan_id"]
        self.account: dict[str, Any] = {
            "plan_id": plan["plan_id"],
            "shard": shard,
            "num_shards": plan["num_shards"],
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": device,
            "starts": earlier.get("starts", 0) + 1 if same else 1,
            "started_at": now_iso(),
            "updated_at": now_iso(),
            "state": RUNNING,
            "exit_status": None,
            "done_before": {},
            "computed": earlier.get("computed", []) if same else [],
            "completed": [],
            "failed": {},
        }
        self.write(self.path.parent / PLAN_NAME, plan)  # every job writes the same plan: whichever lands last

    def done_before(self, key: str, windows: Iterable[int]) -> None:
        """Windows of this job's share that were done when it started; written with the next `save`."""
        self.account["done_before"][key] = sorted(windows)

    def computed(self, key: str, window: int, frames: int, seconds: float) -> None:
        """A window this job has computed: its sampled frames, and the seconds this job spent on it."""
        self.account["computed"].append([key, window, frames, round(seconds, 3)])
        self.save()

    def completed(self, key: str) -> None:
        """A video whose results this job assembled, or found assembled by another job."""
        self.account["completed"].append(key)
        self.save()

    def failed(self, key: str, message: str) -> None:
        self.account["failed"][key] = message
        self.save()

    def state(self, state: str, exit_status: int | None = None) -> None:
        self.account.update(state=state, exit_status=exit_status)
        self.save()

    def __enter__(self) -> JobLog:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, *rest: object) -> None:
        """An error that ends the job: its account says so rather than running on, unheard."""
        if error is not None:
            code = (
                error.code if isinstance(error, SystemExit) else 130 if isinstance(error, KeyboardInterrupt) else None
            )
            self.account["error"] = type(error).__name__  # the job's log says why: a message could hold a secret
            self.state(ENDED, code)

    def save(self) -> None:
        self.account["updated_at"] = now_iso()
        self.write(self.path, self.account)

    def write(self, path: Path, record: dict[str, Any]) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, record, indent=None)  # rewritten after every window: kept small
        except OSError as error:
            if not self.failing:  # once: the job goes on, and says so
                self.warn(f"warning: cannot write {path} (progress only; the results are not affected): {error}")
            self.failing = True


@dataclasses.dataclass(frozen=True)
class VideoProgress:
    """One video of the plan: its windows' planned sampled frames, those done, and its failure."""

    key: str
    frames: list[int]
    done: frozenset[int]
    error: str | None

    @property
    def status(self) -> str:
        if len(self.done) == len(self.frames):
            return "done"
        if self.error:
            return "failed"
        return "in progress" if self.done else "to do"

    @property
    def frames_done(self) -> int:
        return sum(self.frames[window] for window in self.done)


@dataclasses.dataclass(frozen=True)
class JobProgress:
    """One job's account, as last written."""

    shard: int
    state: str
    exit_status: int | None
    host: str
    device: str
    starts: int
    started_at: datetime.datetime
    updated_at: datetime.datetime
    windows: int  # of its share
    windows_done: int
    frames: int  # it computed, over all its starts for this plan
    seconds: float


@dataclasses.dataclass(frozen=True)
class Progress:
    """What the files of .jobs/ say about a launch."""

    output_dir: Path
    plan: dict[str, Any]
    videos: list[VideoProgress]
    jobs: list[JobProgress]  # those that have started, by shard
    other_plans: int  # accounts of jobs that worked on another plan: not counted

    @property
    def frames_computed(self) -> int:
        return sum(job.frames for job in self.jobs)

    @property
    def seconds_per_frame(self) -> float | None:
        """GPU seconds per sampled frame over every window computed so far (the time each job
        spent on its windows; its model load and end-of-share wait are not in it)."""
        frames = self.frames_computed
        return sum(job.seconds for job in self.jobs) / frames if frames else None

    @property
    def frames_left(self) -> int:
        """Planned sampled frames of windows not done, of videos that did not fail."""
        return sum(sum(video.frames) - video.frames_done for video in self.videos if video.status != "failed")

    @property
    def running(self) -> int:
        return sum(job.state == RUNNING for job in self.jobs)

    def seconds_left(self) -> float | None:
        """At the speed so far with as many jobs at once as now run; None before either is known."""
        rate, running = self.seconds_per_frame, self.running
        return self.frames_left * rate / running if rate is not None and running else None


def parse_time(text: Any) -> datetime.datetime:
    try:
        return datetime.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return datetime.datetime.fromtimestamp(0, datetime.timezone.utc)


def read_progress(output_dir: Path) -> Progress:
    """The launch's plan and the accounts of its jobs that have started (ValueError when the
    folder has no plan)."""
    folder = output_dir / JOBS_FOLDER
    plan = read_record(folder / PLAN_NAME)
    if not isinstance(plan.get("videos"), dict) or not isinstance(plan.get("num_shards"), int):
        raise ValueError(
            f"{folder / PLAN_NAME}: no plan of a job here: no job of this version has started on {output_dir}"
        )
    videos: dict[str, dict[str, Any]] = plan["videos"]
    done: dict[str, set[int]] = {key: set() for key in videos}
    for key in plan.get("complete", []):
        done.get(key, set()).update(range(len(videos[key]["frames"])))
    accounts, other_plans = [], 0
    for path in sorted(folder.glob("shard-*.json")):
        account = read_record(path)
        if account.get("plan_id") != plan["plan_id"]:
            other_plans += 1
            continue
        accounts.append(account)
        for key, windows in account.get("done_before", {}).items():
            done.get(key, set()).update(windows)
        for key, window, *_ in account.get("computed", []):
            done.get(key, set()).add(window)
        for key in account.get("completed", []):
            done.get(key, set()).update(range(len(videos.get(key, {"frames": []})["frames"])))
    failed = {key: message for account in accounts for key, message in account.get("failed", {}).items()}
    progress = [
        VideoProgress(
            key,
            video["frames"],
            frozenset(window for window in done[key] if window < len(video["frames"])),
            failed.get(key),
        )
        for key, video in sorted(videos.items())
    ]
    jobs = []
    for account in accounts:
        shard = account.get("shard")
        share = [
            (key, window)
            for key, video in videos.items()
            for window, owner in enumerate(video["shards"])
            if owner == shard
        ]
        computed = account.get("computed", [])
        jobs.append(
            JobProgress(
                shard=shard,
                state=account.get("state", "?"),
                exit_status=account.get("exit_status"),
                host=account.get("host", "?"),
                device=account.get("device", "?"),
                starts=account.get("starts", 1),
                started_at=parse_time(account.get("started_at")),
                updated_at=parse_time(account.get("updated_at")),
                windows=len(share),
                windows_done=sum(window in done[key] for key, window in share),
                frames=sum(entry[2] for entry in computed),
                seconds=sum(entry[3] for entry in computed),
            )
        )
    return Progress(output_dir, plan, progress, sorted(jobs, key=lambda job: job.shard), other_plans)


def duration(seconds: float) -> str:
    """`45 s`, `12 min`, `3.4 h`, `2.1 days`."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def share(done: int, total: int) -> str:
    return f"{done:,} / {total:,}" + (f" ({100 * done / total:.0f}%)" if total else "")


def job_line(job: JobProgress, now: datetime.datetime) -> str:
    heard = duration(max((now - job.updated_at).total_seconds(), 0))
    state = job.state if job.state != ENDED else f"ended, exit {job.exit_status}"
    again = f", started {job.starts} times" if job.starts > 1 else ""
    speed = f", {job.seconds / job.frames:.2f} s/frame" if job.frames else ""
    return (
        f"  job {job.shard:<4} {state:<14} windows {share(job.windows_done, job.windows):<20} "
        f"{job.host}, last heard {heard} ago{again}{speed}"
    )


def video_line(video: VideoProgress, width: int) -> str:
    text = (
        f"  {video.key:<{width}}  {video.status:<11} windows {len(video.done):,} / {len(video.frames):,}, "
        f"~{video.frames_done:,} / ~{sum(video.frames):,} frames"
    )
    return text + (f": {video.error}" if video.status == "failed" else "")


def report(progress: Progress, now: datetime.datetime, every_video: bool = False) -> str:
    """The progress of a launch as text: in all, the speed and time left, each job, and the videos
    in progress and failed (all of them with `every_video`)."""
    videos, jobs, plan = progress.videos, progress.jobs, progress.plan
    counts = {
        status: sum(video.status == status for video in videos) for status in ("done", "in progress", "to do", "failed")
    }
    windows = sum(len(video.frames) for video in videos)
    windows_done = sum(len(video.done) for video in videos)
    frames = sum(sum(video.frames) for video in videos)
    frames_done = sum(video.frames_done for video in videos)
    settings = plan.get("settings", {})
    started = len(jobs)
    lines = [
        f"{progress.output_dir}: plan {plan['plan_id']} of {plan.get('written_at', '?')}, "
        f"{plan['num_shards']} jobs: {progress.running} running, "
        f"{sum(job.state == WAITING for job in jobs)} waiting for other jobs' windows, "
        f"{sum(job.state == ENDED for job in jobs)} ended, {plan['num_shards'] - started} not started",
        f"  videos          {len(videos):,}: " + ", ".join(f"{count:,} {status}" for status, count in counts.items()),
        f"  windows         {share(windows_done, windows)}",
        f"  sampled frames  ~{share(frames_done, frames)} planned (at {settings.get('sample_fps', '?')} per second of video)",
    ]
    rate = progress.seconds_per_frame
    if rate is None:
        lines.append("  speed           not known yet: no window computed")
    else:
        devices = ", ".join(sorted({job.device for job in jobs if job.frames}))
        lines.append(
            f"  speed           {rate:.2f} s per sampled frame on {devices}, over {progress.frames_computed:,} frames computed"
        )
        left = progress.seconds_left()
        work = duration(progress.frames_left * rate)
        if progress.frames_left == 0:
            lines.append("  time left       none: every window is done")
        elif left is None:
            lines.append(f"  time left       ~{work} of one job's work; no job is running")
        else:
            lines.append(
                f"  time left       ~{duration(left)} with {progress.running} jobs at once "
                f"(~{work} of one job's work; model loads not included)"
            )
    if counts["failed"]:
        lines.append(f"  failed          {counts['failed']} videos (listed below; a relaunch tries them again)")
    if progress.other_plans:
        lines.append(f"  ({progress.other_plans} accounts of jobs with another plan, an earlier launch, not counted)")
    if jobs:
        lines.append("jobs:")
        lines += [job_line(job, now) for job in jobs]
    shown = [video for video in videos if every_video or video.status in ("in progress", "failed")]
    if shown:
        lines.append("videos:" if every_video else "videos in progress or failed:")
        width = max(len(video.key) for video in shown)
        lines += [video_line(video, width) for video in shown]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m sam3_pipeline.progress",
        description="How far the jobs writing into OUTPUT_DIR have got: windows and sampled frames done, "
        "failures, speed and time left, from OUTPUT_DIR/.jobs/ only.",
    )
    parser.add_argument(
        "output_dir",
        type=Path,
        metavar="OUTPUT_DIR",
        help="the jobs' --output-dir, or a copy of its .jobs/ folder's parent",
    )
    parser.add_argument("--all", action="store_true", help="list every video, not only those in progress or failed")
    args = parser.parse_args(argv)
    try:
        progress = read_progress(args.output_dir)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report(progress, datetime.datetime.now(datetime.timezone.utc), args.all))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
