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

import contextlib
import itertools
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sam3_pipeline.computing import Computation, compute_video, finished_meanwhile, record_failure, start_redo
from sam3_pipeline.dataset import Video, assign_units, collect_videos
from sam3_pipeline.device import choose_device, choose_dtype, describe_device, leave_a_core_free
from sam3_pipeline.messages import UsageError, VideoError, log
from sam3_pipeline.options import RunSettings, Share, parse_args
from sam3_pipeline.outputs import check_output_dir, output_paths, remove_dead_scratch, remove_stale_partials
from sam3_pipeline.planning import (
    PlanError,
    describe_units,
    planned_windows,
    recipe,
    triage,
    unit_windows,
    units_of,
)
from sam3_pipeline.progress import ENDED, JOBS_FOLDER, WAITING, JobLog, launch_plan
from sam3_pipeline.sam3 import check_prompts, load_segmenter
from sam3_pipeline.share_wait import wait_for_other_shares
from sam3_pipeline.summary import summarize
from sam3_pipeline.windows import WINDOWS_FOLDER, done_windows, unit_done, window_count

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def check_device(requested_device: str, requested_dtype: str) -> int:
    """--check-device: say what a run would compute on, or fail the way a run would."""
    device = choose_device(requested_device)
    print(describe_device(device, choose_dtype(requested_dtype, device)))
    return EXIT_OK


def run(
    inputs: Sequence[Path],
    output_dir: Path,
    settings: RunSettings,
    share: Share,
    requested_device: str,
    requested_dtype: str,
    model_step: str,
    serial: bool,
    overwrite: bool,
) -> int:
    """Compute this job's share of the windows of the videos found in `inputs` into `output_dir`
    and assemble every video whose windows are all there; returns the exit status."""
    started = time.time()
    # Before anything else: a worker that cannot see its GPU must fail now, not crawl for hours.
    device = choose_device(requested_device)
    dtype = choose_dtype(requested_dtype, device)
    videos = collect_videos(inputs, output_dir)
    paths_of = {video: output_paths(output_dir, video.key) for video in videos}
    try:
        found = triage(videos, paths_of, settings, share, overwrite)
    except PlanError as error:  # a guess at the video's windows would move other videos' windows between jobs
        log(
            f"error: cannot read {error}; every job reads every video to make the same split, so this job "
            "computes nothing and exits 1, to be retried (SkyPilot's job_recovery)"
        )
        return EXIT_FAILED
    todo, plans = found.todo, found.plans
    every_unit = [unit for video in videos for unit in units_of(video, plans[video], settings.chunk_frames)]
    shards = assign_units(every_unit, share.count)
    my_units = [unit for unit, shard in zip(every_unit, shards, strict=True) if shard == share.index]
    planned = {video: window_count(plan and plan["positions"], settings.chunk_frames) for video, plan in plans.items()}
    for video in dict.fromkeys(unit.video for unit in my_units if unit.video not in todo):  # this job's share only
        log(f"skip {video.path}: complete in {paths_of[video]['folder']} (--overwrite to redo)")
    units = [unit for unit in my_units if unit.video in todo]
    if share.count > 1:
        count = len({unit.video for unit in units})
        windows = sum(len(unit_windows(unit, planned[unit.video])) for unit in units)
        frames = sum(unit.weight for unit in units)
        log(
            f"shard {share.index}/{share.count}: {count} video{'s' * (count != 1)}, "
            f"{windows} window{'s' * (windows != 1)}, ~{frames} sampled frames: "
            f"{describe_units(units, planned)}"
        )
    check_output_dir(output_dir)
    complete_before = [video.key for video in videos if video not in todo]
    windows_planned = planned_windows(every_unit, shards, plans, settings.chunk_frames)
    launch = {**settings.record(), "overwrite": overwrite}  # a redo on purpose is another plan
    plan = launch_plan(windows_planned, complete_before, share.count, launch)
    job = JobLog(output_dir, plan, share.index, str(device), log)
    for unit in my_units:
        if unit.video not in todo:
            job.done_before(unit.video.key, unit_windows(unit, planned[unit.video]))
    with job:  # an error that ends the run ends the job's account too
        if not units:
            log("nothing to do: " + ("this shard has no videos" if share.count > 1 else "every video is complete"))
            if share.count > 1 and share.bucket_lag > 0 and todo:  # its summary must not miss the others' work
                job.state(WAITING)
                wait_for_other_shares([], todo, paths_of, settings, share.bucket_lag, lambda video, error: None)
            job.state(ENDED, EXIT_OK)
            return EXIT_OK
        mine = list(dict.fromkeys(unit.video for unit in units))
        folders = [output_dir, *(paths_of[video]["folder"] for video in mine)]
        folders += [folder / WINDOWS_FOLDER for folder in folders[1:]] + [output_dir / JOBS_FOLDER]
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
            done[video] = {} if overwrite else done_windows(paths["folder"], recipe(video, settings))
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
            segmenter = load_segmenter(settings.model, device, dtype, model_step)
            check_prompts(segmenter.processor, settings.prompts)
            log(
                f"model {settings.model}, prompts {list(settings.prompts)}, "
                f"SAM3 post-processing: {segmenter.postprocessing}, step per frame: {segmenter.model_step}"
            )
            log(describe_device(device, dtype))

        how = Computation(settings, serial, share)
        complete: list[Video] = []
        waiting: list[Video] = []
        numbered = {unit: number for number, unit in enumerate(pending, start=1)}
        before = {video: set(records) for video, records in done.items()}
        for video, group in itertools.groupby(units, key=lambda unit: unit.video):
            if video not in done:
                continue
            paths = paths_of[video]
            try:
                metadata = finished_meanwhile(video, paths, found.seen[video], video in found.outdated, share.bucket_lag)
                if metadata is not None:
                    log(f"skip {video.path}: completed by another job since this one started")
                else:
                    metadata = compute_video(
                        list(group), paths, segmenter, how, plans[video], done[video], numbered, job
                    )
            except Exception as error:  # one bad video (or one failed write) never stops the others
                fail(video, error)
                continue
            if metadata is not None:
                complete.append(video)
                job.completed(video.key)
            else:
                waiting.append(video)
        if share.count > 1 and share.bucket_lag > 0:
            job.state(WAITING)
            assembled, waiting = wait_for_other_shares(waiting, todo, paths_of, settings, share.bucket_lag, fail)
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
            return check_device(args.device, args.dtype)
        if args.summarize is not None:
            summarize(args.summarize, args.inputs)
            return EXIT_OK
        return run(
            args.inputs,
            args.output_dir,
            RunSettings.of(args),
            Share.of(args),
            args.device,
            args.dtype,
            args.model_step,
            args.serial,
            args.overwrite,
        )
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
