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
folder could not be listed or a video read to plan the shares), 2 on a usage error.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from sam3_pipeline.computing import Computation, ShareWork, log_computed
from sam3_pipeline.dataset import ListingError, collect_videos
from sam3_pipeline.device import choose_device, choose_dtype, describe_device, leave_a_core_free
from sam3_pipeline.messages import UsageError, log
from sam3_pipeline.options import RunSettings, Share, parse_args
from sam3_pipeline.outputs import check_output_dir, output_paths, remove_dead_scratch, remove_stale_partials
from sam3_pipeline.planning import PlanError, launch_record, plan_launch, unit_windows
from sam3_pipeline.progress import ENDED, JOBS_FOLDER, WAITING, JobLog
from sam3_pipeline.sam3 import Segmenter, check_prompts, load_segmenter
from sam3_pipeline.share_wait import wait_for_other_shares
from sam3_pipeline.summary import summarize
from sam3_pipeline.windows import WINDOWS_FOLDER, unit_done

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
        launch = plan_launch(videos, paths_of, settings, share, overwrite)
    except PlanError as error:  # a guess at the video's windows would move other videos' windows between jobs
        log(
            f"error: cannot read {error}; every job reads every video to make the same split, so this job "
            "computes nothing and exits 1, to be retried (SkyPilot's job_recovery)"
        )
        return EXIT_FAILED
    check_output_dir(output_dir)
    job = JobLog(output_dir, launch_record(launch, videos, settings, share, overwrite), share.index, str(device), log)
    for unit in launch.mine:
        if unit.video not in launch.found.todo:
            job.done_before(unit.video.key, unit_windows(unit, launch.planned[unit.video]))
    waits = share.count > 1 and share.bucket_lag > 0  # for other jobs' last windows, at the end
    with job:  # an error that ends the run ends the job's account too
        if not launch.units:
            log("nothing to do: " + ("this shard has no videos" if share.count > 1 else "every video is complete"))
            if waits and launch.found.todo:  # its summary must not miss the others' work
                job.state(WAITING)
                wait_for_other_shares([], launch.found.todo, paths_of, settings, share.bucket_lag, lambda *_: None)
            job.state(ENDED, EXIT_OK)
            return EXIT_OK
        mine = list(dict.fromkeys(unit.video for unit in launch.units))
        remove_leftovers(output_dir, [paths_of[video]["folder"] for video in mine], started)

        work = ShareWork(job, paths_of)
        done = work.windows_done(mine, settings, overwrite)
        for unit in launch.units:
            if unit.video in done:
                computed_before = set(unit_windows(unit, launch.planned[unit.video])) & done[unit.video].keys()
                job.done_before(unit.video.key, computed_before)
        job.save()
        pending = [
            unit for unit in launch.units if unit.video in done and not unit_done(done[unit.video], unit.first, unit.last)
        ]
        segmenter = load_model(settings, device, dtype, model_step) if pending else None

        before = {video: set(records) for video, records in done.items()}
        how = Computation(settings, serial, share)
        complete, waiting = work.compute(launch.units, pending, launch.found, done, segmenter, how)
        if waits:
            job.state(WAITING)
            assembled, waiting = wait_for_other_shares(
                waiting, launch.found.todo, paths_of, settings, share.bucket_lag, work.fail
            )
            complete += assembled
            for video in assembled:
                job.completed(video.key)
        log_computed(done, before, device)
        return work.end(len(mine), complete, waiting)


def remove_leftovers(output_dir: Path, folders: Sequence[Path], started: float) -> None:
    """Remove what killed runs left half-written in the folders this job writes (`started`:
    time.time() when it began, so that nothing of its own is taken)."""
    searched = [output_dir, *folders, *(folder / WINDOWS_FOLDER for folder in folders), output_dir / JOBS_FOLDER]
    leftovers = remove_stale_partials(searched, started) + remove_dead_scratch()
    if leftovers:
        log(f"removed {len(leftovers)} leftovers of killed runs: {', '.join(map(str, leftovers))}")


def load_model(settings: RunSettings, device: torch.device, dtype: torch.dtype, model_step: str) -> Segmenter:
    """SAM3, once per run, and the lines that say with what it runs."""
    leave_a_core_free(device)
    segmenter = load_segmenter(settings.model, device, dtype, model_step)
    check_prompts(segmenter.processor, settings.prompts)
    log(
        f"model {settings.model}, prompts {list(settings.prompts)}, "
        f"SAM3 post-processing: {segmenter.postprocessing}, step per frame: {segmenter.model_step}"
    )
    log(describe_device(device, dtype))
    return segmenter


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
    except ListingError as error:  # a share made from part of the listing would not be the other jobs'
        print(f"error: cannot list {error}; this job computes nothing and exits 1, to be retried", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # whoever read the output stopped early (`--summarize DIR | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush is quiet
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    raise SystemExit(main())
