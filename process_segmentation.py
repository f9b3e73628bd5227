"""Track every object that matches a few text prompts through videos with SAM3.

Each video has a key: its path inside the folder it was found in, without the extension
("train/10001/en"), or the file name without the extension for a video given as a file. For each
video this writes, under OUTPUT_DIR/<key>/, with <name> the key's last part ("en"):
  <name>_segmented.mp4   H.264 (yuv420p, faststart) with each object's mask, box, ID and prompt drawn
  <name>_tracks.jsonl    per frame: each object's ID, prompt, score, box and COCO RLE mask
  <name>_mot.txt         the boxes in MOTChallenge format
  <name>_preview.jpg     a contact sheet of six overlay frames
  <name>_metadata.json   what was processed and found; written last, so its presence means "complete"
  <name>_error.json      only when the video failed: one line saying why

Usage:
  python process_segmentation.py match.mp4
  python process_segmentation.py videos/ other.mov --prompts "soccer player" ball --sample-fps 2
  python process_segmentation.py /data/videos --shard-index 3 --num-shards 10   # this job's share
  python process_segmentation.py --summarize OUTPUT_DIR [videos/]               # done / partial / failed / missing

Frames stream through: a decode thread, SAM3 in the main thread and the outputs in a forked process
work side by side, a few frames apart (--serial: one after another). The model is loaded once per run.
Exit status: 0 when every video is complete, 1 when any video failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import math
import signal
import sys
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
from tqdm import tqdm

from sam3_pipeline.dataset import Video, collect_videos, select_shard
from sam3_pipeline.device import (
    DTYPES,
    choose_device,
    choose_dtype,
    describe_device,
    dtype_name,
    leave_a_core_free,
)
from sam3_pipeline.messages import UsageError, VideoError, log, one_line, redact
from sam3_pipeline.outputs import (
    ObjectTrack,
    TrackWriter,
    check_output_dir,
    file_record,
    now_iso,
    output_paths,
    output_problems,
    publish,
    read_record,
    remove_dead_scratch,
    remove_stale_partials,
    scratch_dir,
    source_change,
    update_tracks,
    write_json,
)
from sam3_pipeline.overlay import PreviewSheet, draw_overlay
from sam3_pipeline.sam3 import (
    DEFAULT_CHUNK_FRAMES,
    ModelFrame,
    Segmenter,
    check_prompts,
    load_segmenter,
    model_frames,
    prepare_frames,
    track_objects,
)
from sam3_pipeline.stages import ChildProcess, RunAhead, StageTimes
from sam3_pipeline.summary import summarize
from sam3_pipeline.video_io import (
    DecodeReport,
    H264Writer,
    display_rotation,
    output_rate,
    read_video_info,
    sample_frames,
)

DEFAULT_MODEL = "facebook/sam3"
DEFAULT_PROMPTS = ("soccer player", "ball")
DEFAULT_SAMPLE_FPS = Fraction(1)
# Frames further apart than this share nothing for SAM3 to track: one per hour is already a series
# of stills. Below it a typo (0.0004 for 0.04) would quietly process almost nothing.
MIN_SAMPLE_FPS = Fraction(1, 3600)
# Frames waiting between two stages: enough to ride out one slow frame, few enough that memory
# stays flat (a 720p frame with SAM3's input is ~15 MB; its 20 objects' logits ~7 MB).
STAGE_QUEUE_DEPTH = 4
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def default_output_dir() -> Path:
    """Under /outputs when it exists (the bucket mounted by the SkyPilot YAMLs), else here."""
    outputs = Path("/outputs")
    return outputs / "segmentation_results" if outputs.is_dir() else Path("segmentation_results")


def sample_rate(text: str) -> Fraction:
    """--sample-fps: a decimal or a fraction ("0.5", "30000/1001"), kept exact so that the rate
    sampled, the MP4's frame rate and the one recorded are the same number."""
    try:
        rate = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}") from None
    # FFmpeg keeps rates as 32-bit fractions; a microsecond-exact rate is plenty.
    return rate.limit_denominator(1_000_000)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Text-prompted video segmentation with SAM3: overlay MP4 + metadata JSON per video.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "inputs", nargs="*", type=Path, help="video files or folders of videos (searched recursively)"
    )
    parser.add_argument("--output-dir", type=Path, default=default_output_dir(), help="where results go")
    parser.add_argument(
        "--prompts", nargs="+", default=list(DEFAULT_PROMPTS), help="text prompts, one object class each"
    )
    parser.add_argument(
        "--sample-fps",
        type=sample_rate,
        default=DEFAULT_SAMPLE_FPS,
        help="frames per second of video time to process, a decimal or fraction (30000/1001); "
        "at least 1/3600 (one per hour); 0 = every frame",
    )
    parser.add_argument(
        "--max-frames",
        type=int,
        default=0,
        help="stop each video after this many sampled frames; 0 = no limit",
    )
    parser.add_argument(
        "--chunk-frames",
        type=int,
        default=DEFAULT_CHUNK_FRAMES,
        help="sampled frames per SAM3 session; bounds memory on long videos",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hugging Face model ID or local directory")
    parser.add_argument(
        "--device",
        choices=("auto", "cuda", "cpu"),
        default="auto",
        help="auto = cuda when available, else cpu with a warning; cuda = fail at once without a usable GPU",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="model precision; auto = bfloat16 on GPUs that support it, else float32",
    )
    parser.add_argument(
        "--check-device",
        action="store_true",
        help="process nothing; print the device and precision a run would use, or why it cannot (exit 2)",
    )
    parser.add_argument(
        "--serial",
        action="store_true",
        help="decode, run SAM3 and write outputs one after another in one thread rather than side by side "
        "(the same outputs, slower; for comparison)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="redo videos whose results are already complete"
    )
    parser.add_argument(
        "--no-tracks",
        dest="tracks",
        action="store_false",
        help="skip the per-frame tracks (JSONL with COCO RLE masks, MOT text)",
    )
    parser.add_argument(
        "--shard-index", type=int, default=0, help="which share of the videos this process takes (0-based)"
    )
    parser.add_argument("--num-shards", type=int, default=1, help="how many shares the videos are split into")
    parser.add_argument(
        "--summarize",
        type=Path,
        metavar="DIR",
        help="process nothing; write DIR/summary.json and DIR/summary.csv (done / partial / failed / missing per video). "
        "INPUTs, if given, are the videos expected in DIR",
    )
    args = parser.parse_args(argv)
    if not args.inputs and args.summarize is None and not args.check_device:
        parser.error("the following arguments are required: inputs (or --summarize DIR, or --check-device)")
    if args.max_frames < 0:
        parser.error(f"--max-frames must be 0 or more, got {args.max_frames}")
    if args.chunk_frames < 2:
        parser.error(f"--chunk-frames must be 2 or more (windows share one frame), got {args.chunk_frames}")
    if args.sample_fps < 0 or 0 < args.sample_fps < MIN_SAMPLE_FPS:
        parser.error(
            f"--sample-fps must be 0 (every frame) or at least {MIN_SAMPLE_FPS} (one frame per hour), "
            f"got {float(args.sample_fps):g}"
        )
    if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        parser.error(
            f"--shard-index must be in [0, --num-shards), got {args.shard_index} of {args.num_shards}"
        )
    args.prompts = [" ".join(prompt.split()) for prompt in args.prompts]
    if not all(args.prompts):
        parser.error("--prompts must not contain empty text")
    if len(set(args.prompts)) != len(args.prompts):
        parser.error(f"--prompts has duplicates: {args.prompts}")
    return args


@dataclasses.dataclass(frozen=True)
class Recorded:
    """What the outputs stage saw of a video, for its metadata."""

    tracks: dict[int, ObjectTrack]
    timestamps: list[float]  # each output frame's time in the video, seconds
    frame_indices: list[int]  # each output frame's index in the source
    windows: list[int]  # frames per SAM3 session
    stage_seconds: dict[str, float]


def draw_and_record(
    frames: Iterable[ModelFrame], size: tuple[int, int], fps: Fraction, local: dict[str, Path], write_tracks: bool
) -> Recorded:
    """The outputs stage: masks and IDs from SAM3's output, then per frame the overlay (encoded
    to H.264), the preview, the tracks and MOT rows and the per-object summary, into the files
    named in `local` (all but the metadata). size: (H, W) of every frame."""
    times = StageTimes()
    summaries: dict[int, ObjectTrack] = {}
    timestamps: list[float] = []
    frame_indices: list[int] = []
    windows: list[int] = []
    preview = PreviewSheet(size)
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(H264Writer(local["video"], size[1], size[0], fps))
        track_writer = stack.enter_context(TrackWriter(local["tracks"], local["mot"], size)) if write_tracks else None
        for sample, detections in track_objects(frames, size, windows, times):
            frame_number = len(timestamps)
            with times.measure("overlay"):
                drawn = draw_overlay(sample.rgb, detections)
            with times.measure("encode"):
                writer.write(drawn)
            with times.measure("preview"):
                preview.offer(frame_number, sample.timestamp, drawn)
            with times.measure("tracks"):
                if track_writer:
                    track_writer.write(frame_number, sample, detections)
                update_tracks(summaries, frame_number, sample.timestamp, detections)
            timestamps.append(round(sample.timestamp, 6))
            frame_indices.append(sample.source_index)
    with times.measure("preview"):
        preview.save(local["preview"])
    return Recorded(summaries, timestamps, frame_indices, windows, times.rounded())


def process_video(
    video: Video, paths: dict[str, Path], segmenter: Segmenter, args: argparse.Namespace
) -> dict[str, Any]:
    """Segment one video: decode -> SAM3 -> masks, overlay, H.264 and records, frame by frame, the
    stages side by side (unless --serial). Returns its metadata; its files are in place."""
    started = time.monotonic()
    source = video.path
    try:
        container = av.open(str(source))
    except (av.FFmpegError, OSError) as error:
        raise VideoError(f"{source}: not a readable video: {one_line(error)}") from None

    paths["folder"].mkdir(parents=True, exist_ok=True)
    products = ["video", "preview", *(["tracks", "mot"] if args.tracks else [])]
    for key in {"tracks", "mot"} - set(products):  # not part of this run's results
        paths[key].unlink(missing_ok=True)
    report = DecodeReport()
    with container, scratch_dir() as scratch:
        info = read_video_info(container, source)
        fps_out = output_rate(args.sample_fps, info.fps)
        expected = math.ceil(info.duration * fps_out) if info.duration else None
        if args.max_frames and expected:
            expected = min(expected, args.max_frames)
        times = StageTimes()
        frames = times.iterate("decode", sample_frames(container, args.sample_fps, args.max_frames, report))
        try:
            first = next(frames, None)
        except av.FFmpegError as error:
            raise VideoError(f"{source}: cannot decode: {one_line(error)}") from None
        if first is None:
            raise VideoError(f"{source}: no frames could be decoded")
        size = first.rgb.shape[:2]  # as displayed: (H, W) after the display matrix
        local = {key: Path(scratch) / paths[key].name for key in products}
        with contextlib.ExitStack() as stack:
            progress = stack.enter_context(
                tqdm(total=expected, unit="frame", desc=video.key, leave=False, dynamic_ncols=True)
            )

            def counted(outputs: Iterator[ModelFrame]) -> Iterator[ModelFrame]:
                for output in outputs:
                    if not output.shared:  # a frame two windows share is one frame of the video
                        progress.update()
                    if report.timestamp_discontinuities and progress.total:  # the container's duration misled
                        progress.total = None
                    yield output

            samples = itertools.chain([first], frames)
            finish = (size, fps_out, local, args.tracks)
            if args.serial:
                prepared = prepare_frames(segmenter, samples, times)
            else:  # the outputs process is forked first, before this process starts a thread
                outputs_process = stack.enter_context(ChildProcess(draw_and_record, finish, STAGE_QUEUE_DEPTH))
                prepared = stack.enter_context(
                    RunAhead(prepare_frames(segmenter, samples, times), STAGE_QUEUE_DEPTH, "decode")
                )
            outputs = counted(model_frames(segmenter, prepared, args.prompts, args.chunk_frames, times))
            recorded = draw_and_record(outputs, *finish) if args.serial else outputs_process.run(outputs)
        outputs = {key: file_record(local[key]) for key in products}
        for key in products:  # the metadata, written by the caller, comes last
            publish(local[key], paths[key])

    seconds = time.monotonic() - started
    rotation, mirrored = display_rotation(report.transform)
    geometry = report.geometry
    if report.timestamp_discontinuities:
        expected = None  # estimated from the container's duration, which does not span restarts
    objects = sorted(recorded.tracks.values(), key=lambda track: track.object_id)
    return {
        "status": "complete",
        "key": video.key,
        "video_name": source.name,
        "source_path": str(source),
        "source_name": source.name,
        "source_bytes": video.size,  # as listed, which is what the next run compares
        "width": size[1],
        "height": size[0],
        "stored_width": geometry.stored[0],
        "stored_height": geometry.stored[1],
        "sample_aspect_ratio": "{0.numerator}:{0.denominator}".format(geometry.sample_aspect_ratio),
        "size_changes": report.size_changes,
        "timestamp_discontinuities": report.timestamp_discontinuities,
        "rotation": rotation,
        "mirrored": mirrored,
        "duration_seconds": info.duration,
        "original_fps": float(info.fps),
        "sample_fps": float(args.sample_fps),
        "output_fps": float(fps_out),
        "max_frames": args.max_frames,
        "chunking": {
            "chunk_frames": args.chunk_frames,
            "windows": len(recorded.windows),
            "frames_per_window": recorded.windows,
        },
        "frames_processed": len(recorded.timestamps),
        "frames_expected": expected,
        "decode_error": report.error,
        "sampled_timestamps": recorded.timestamps,
        "sampled_frame_indices": recorded.frame_indices,
        "prompts": list(args.prompts),
        "objects_detected": len(objects),
        "objects_per_prompt": {prompt: sum(t.prompt == prompt for t in objects) for prompt in args.prompts},
        "objects": [
            {
                "id": track.object_id,
                "prompt": track.prompt,
                "first_frame": track.first_frame,
                "last_frame": track.last_frame,
                "first_timestamp": track.first_time,
                "last_timestamp": track.last_time,
                "frames_present": track.frames_present,
                "score": round(track.max_score, 4),
                "mean_score": round(track.score_sum / track.frames_present, 4),
            }
            for track in objects
        ],
        "model": segmenter.model_name,
        "device": str(segmenter.device),
        "dtype": dtype_name(segmenter.dtype),
        "postprocessing": segmenter.postprocessing,
        "processing_seconds": round(seconds, 3),
        "pipeline": "serial" if args.serial else "overlapped",
        "stage_seconds": {**times.rounded(), **recorded.stage_seconds},
        "frames_per_second": round(len(recorded.timestamps) / seconds, 3) if seconds > 0 else None,
        "output_video": str(paths["video"]),
        "outputs": outputs,
        "output_codec": "h264",
        "completed_at": now_iso(),
    }


def start_redo(paths: dict[str, Path]) -> None:
    """Remove a video's metadata before anything else about its redo can fail: an old "complete"
    left standing would make the summary and later runs take the video as done."""
    paths["metadata"].unlink(missing_ok=True)


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


def run(args: argparse.Namespace) -> int:
    started = time.time()
    # Before anything else: a worker that cannot see its GPU must fail now, not crawl for hours.
    device = choose_device(args.device)
    dtype = choose_dtype(args.dtype, device)
    videos = collect_videos(args.inputs, args.output_dir)
    videos = select_shard(videos, args.shard_index, args.num_shards)
    if args.num_shards > 1:
        log(
            f"shard {args.shard_index}/{args.num_shards}: {len(videos)} videos: {', '.join(v.key for v in videos)}"
        )
    if not videos:
        log("nothing to do: this shard has no videos")
        return EXIT_OK
    check_output_dir(args.output_dir)
    paths_of = {video: output_paths(args.output_dir, video.key) for video in videos}
    folders = [args.output_dir, *(paths["folder"] for paths in paths_of.values())]
    leftovers = remove_stale_partials(folders, started) + remove_dead_scratch()
    if leftovers:
        log(f"removed {len(leftovers)} leftovers of killed runs: {', '.join(map(str, leftovers))}")
    todo = []
    for video in videos:
        paths = paths_of[video]
        metadata = {} if args.overwrite else read_record(paths["metadata"])
        if metadata.get("status") == "complete":
            problems = output_problems(paths["folder"], metadata)
            change = source_change(metadata, video)
            if not problems and not change:
                log(f"skip {video.path}: complete in {paths['folder']} (--overwrite to redo)")
                continue
            if change:
                log(f"redo {video.path}: the results in {paths['folder']} were {change}")
            else:
                log(f"redo {video.path}: its results in {paths['folder']} are not whole: {'; '.join(problems)}")
        todo.append(video)
    failures: list[str] = []
    for video in [video for video in todo if video.size is None]:  # fail these before the slow model load
        todo.remove(video)
        with contextlib.suppress(OSError):  # it fails either way; the error record says why
            start_redo(paths_of[video])
        failures.append(record_failure(video, paths_of[video], VideoError(f"{video.path}: no such file")))
        log(f"FAILED {failures[-1]}")
    if not todo:
        return EXIT_FAILED if failures else EXIT_OK

    leave_a_core_free(device)
    segmenter = load_segmenter(args.model, device, dtype)
    check_prompts(segmenter.processor, args.prompts)
    log(f"model {args.model}, prompts {args.prompts}, SAM3 post-processing: {segmenter.postprocessing}")
    log(describe_device(device, dtype))

    for number, video in enumerate(tqdm(todo, unit="video", desc="videos", dynamic_ncols=True), start=1):
        paths = paths_of[video]
        log(f"{number}/{len(todo)} - {video.path}")
        try:
            start_redo(paths)
            metadata = process_video(video, paths, segmenter, args)
            write_json(paths["metadata"], metadata)  # last: its presence means complete
        except Exception as error:  # one bad video (or one failed write) never stops the others
            failures.append(record_failure(video, paths, error))
            log(f"FAILED {failures[-1]}")
            continue
        with contextlib.suppress(OSError):  # the complete metadata outranks an old error record
            paths["error"].unlink(missing_ok=True)
        log_notes(video, metadata)
        log(
            f"done {video.path.name}: {metadata['frames_processed']} frames, {metadata['objects_detected']} objects "
            f"{metadata['objects_per_prompt']}, {metadata['frames_per_second']} frames/s -> {paths['video']}"
        )
    log(f"{len(videos) - len(failures)} of {len(videos)} videos complete, {len(failures)} failed")
    for message in failures:
        log(f"  failed: {message}")
    return EXIT_FAILED if failures else EXIT_OK


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


if __name__ == "__main__":
    raise SystemExit(main())
