"""Windows as the unit of work: how many a video has, which ones a process computes, and each
window's results on disk, written so that a window is either whole or absent.

A window is a stretch of up to --chunk-frames sampled frames tracked by one SAM3 session
(`sam3.window_of`); which frames it holds follows from their times alone, so any process can
compute any window. Its results go to the video's output folder, under `windows/`, with the IDs
of its own session:

  w00003-<sha>.mp4            its frames of the overlay video (not the one it shares with window 2)
  w00003-<sha>_tracks.jsonl   its tracks and MOT rows, frames numbered from 0 within the window
  w00003-<sha>_mot.txt        (both only with tracks)
  w00003.json                 its record, written last: what it holds, how it joins the window
                              before, and the files above by name, size and SHA-256

<sha> is the first 12 hex digits of the file's SHA-256: two workers that compute one window (a
recovered job beside its old copy's late uploads) never write over each other's files, so a
record always names files of its own computation, whichever record lands last.

`assembly.py` joins them into the video's results once every window is there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import socket
import time
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from typing import Any

from sam3_pipeline.files import now_iso, read_record, write_json
from sam3_pipeline.messages import VideoError
from sam3_pipeline.outputs import (
    ObjectTrack,
    TrackWriter,
    file_record,
    listed_file_problems,
    object_records,
    publish,
    update_tracks,
)
from sam3_pipeline.overlay import draw_overlay
from sam3_pipeline.sam3 import Detections, shared_position
from sam3_pipeline.stages import StageTimes
from sam3_pipeline.video_io import H264Writer, SampledFrame

WINDOWS_FOLDER = "windows"
RECORD_NAME = re.compile(r"w(\d{5,})\.json")
WINDOW_PART = re.compile(r"w\d{5,}(-[0-9a-f]{12})?\.mp4")  # without the digest: written before it was added
DIGEST_LENGTH = 12
# What assembly reads of a window record, by field and type: a record without one of them (written
# by an older version, or cut short) is as good as missing and the window is computed again.
RECORD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "window": int,
    "final": bool,
    "frames": int,
    "recipe": dict,
    "video": dict,
    "positions": list,
    "timestamps": list,
    "source_frames": list,
    "size_changes": int,
    "timestamp_discontinuities": int,
    "frames_behind": int,
    "object_order": list,
    "objects": list,
    "shared_objects": (list, type(None)),
    "last_objects": list,
    "outputs": dict,
    "seconds": (int, float),
    "stage_seconds": dict,
    "completed_at": str,
    "computed_by": dict,
    "device": str,
    "dtype": str,
    "postprocessing": str,
    "pipeline": str,
    "decode_error": (str, type(None)),
}
RECIPE_FIELDS = ("source_name", "source_bytes", "prompts", "chunk_frames", "model", "tracks")
VIDEO_FIELDS = ("key", "source_path", "width", "height", "frames_expected")
TRACK_FIELDS = ("object_id", "prompt", "first_frame", "last_frame", "first_time", "last_time")
TRACK_FIELDS += ("frames_present", "max_score", "score_sum")


class BrokenWindows(VideoError):
    """Windows whose files do not hold what their records list: they count as not done."""

    def __init__(self, problems: dict[int, list[str]]) -> None:
        self.problems = problems
        described = "; ".join(f"window {window}: {', '.join(found)}" for window, found in sorted(problems.items()))
        super().__init__(f"windows whose files are not as recorded, to compute again: {described}")


def window_count(expected_positions: int | None, chunk_frames: int) -> int:
    """How many windows a video of `expected_positions` grid positions is planned as (its
    container's duration x the rate): window 0 takes chunk_frames, each later one chunk_frames-1.
    Unknown length: one. The last planned window runs on to the end, however long the video
    turns out to be."""
    if not expected_positions or expected_positions <= chunk_frames:
        return 1
    return 1 + math.ceil((expected_positions - chunk_frames) / (chunk_frames - 1))


def window_positions(window: int, chunk_frames: int) -> tuple[int, int]:
    """The grid positions whose samples are the window's own: (first, last), inclusive."""
    if window == 0:
        return 0, chunk_frames - 1
    return shared_position(window, chunk_frames) + 1, shared_position(window + 1, chunk_frames)


def planned_frames(expected_positions: int | None, chunk_frames: int) -> list[int]:
    """The sampled frames each planned window (`window_count`) is expected to hold, in order:
    chunk_frames for window 0, chunk_frames-1 for each later one (its frame shared with the
    window before is not its own), the rest for the last. Unknown length: one window of chunk_frames."""
    last = expected_positions or chunk_frames
    spans = [window_positions(window, chunk_frames) for window in range(window_count(expected_positions, chunk_frames))]
    return [end - start + 1 for start, end in spans[:-1]] + [max(last - spans[-1][0], 1)]


def plan_units(windows: int, seekable: bool) -> list[tuple[int, int | None]]:
    """A video's units of work, as (first window, last window or None for "to the end").

    Where frames can be found by seeking, each window is a unit. Elsewhere (MPEG-TS, streams
    without an index) reaching window k means decoding everything before it, so the whole video
    is one unit, which still keeps and reuses its windows one by one."""
    if not seekable:
        return [(0, None)]
    return [(window, window) for window in range(windows - 1)] + [(windows - 1, None)]


def window_files(folder: Path, window: int, digests: dict[str, str] | None = None) -> dict[str, Path]:
    """Where window `window` of the video whose output folder is `folder` keeps its record, and
    its files with these SHA-256 `digests` (by kind; without them, the names in a scratch folder)."""
    base = folder / WINDOWS_FOLDER / f"w{window:05d}"

    def named(kind: str, suffix: str) -> Path:
        digest = f"-{digests[kind][:DIGEST_LENGTH]}" if digests and kind in digests else ""
        return base.with_name(f"{base.name}{digest}{suffix}")

    return {
        "record": base.with_suffix(".json"),
        "video": named("video", ".mp4"),
        "tracks": named("tracks", "_tracks.jsonl"),
        "mot": named("mot", "_mot.txt"),
    }


def window_file(folder: Path, record: dict[str, Any], kind: str) -> Path:
    """The file of `kind` ("video", "tracks", "mot") that a window's record names."""
    return folder / WINDOWS_FOLDER / record["outputs"][kind]["file"]


def record_problems(record: dict[str, Any]) -> list[str]:
    """What a window record lacks of what assembly reads: [] when it can be used."""
    problems = [
        f"{field} is missing or not {' or '.join(kind.__name__ for kind in kinds)}"
        for field, kind in RECORD_FIELDS.items()
        for kinds in [kind if isinstance(kind, tuple) else (kind,)]
        if not isinstance(record.get(field), kinds) or (bool not in kinds and isinstance(record.get(field), bool))
    ]
    if problems:
        return problems
    problems += [f"recipe lacks {field}" for field in RECIPE_FIELDS if field not in record["recipe"]]
    problems += [f"video lacks {field}" for field in VIDEO_FIELDS if field not in record["video"]]
    if len(record["timestamps"]) != record["frames"] or len(record["source_frames"]) != record["frames"]:
        problems.append(f"its timestamps do not count its {record['frames']} frames")
    if any(not isinstance(track, dict) or not set(TRACK_FIELDS) <= track.keys() for track in record["objects"]):
        problems.append("an object summary lacks a field")
    kinds = ["video", *(["tracks", "mot"] if record["recipe"].get("tracks") else [])] if record["frames"] else []
    problems += [f"it lists no {kind} file" for kind in kinds if kind not in record["outputs"]]
    return problems


def done_windows(folder: Path, recipe: dict[str, Any] | None = None) -> dict[int, dict[str, Any]]:
    """The complete windows of a video, by number: records that say complete, hold what assembly
    reads (`record_problems`), whose files are there with their listed sizes and, when `recipe`
    is given, that were computed with that recipe (the same source, prompts, rate, window size,
    model); others are as good as missing. Contents are checked where they are read
    (`content_problems`)."""
    records = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder / WINDOWS_FOLDER):
            match = RECORD_NAME.fullmatch(entry.name)
            if not match:
                continue
            record = read_record(Path(entry.path))
            if record.get("status") != "complete" or record.get("window") != int(match[1]):
                continue
            if record_problems(record) or (recipe is not None and record["recipe"] != recipe):
                continue
            if not listed_file_problems(folder / WINDOWS_FOLDER, record["outputs"]):
                records[record["window"]] = record
    return records


def content_problems(folder: Path, record: dict[str, Any]) -> list[str]:
    """What is wrong with the bytes of the files a window's record lists: [] when each has its
    listed SHA-256."""
    return listed_file_problems(folder / WINDOWS_FOLDER, record["outputs"], contents=True)


def complete_run(records: dict[int, dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Windows 0, 1, ... up to the first that ends the video, when each is there and all were
    computed alike; None while any is missing."""
    run = []
    for window in range(len(records) + 1):
        record = records.get(window)
        if record is None or record["recipe"] != records[0]["recipe"]:
            return None
        run.append(record)
        if record["final"]:
            return run
    return None


def drop_windows(folder: Path, windows: Iterable[int]) -> None:
    """Remove the records of windows found broken, so that every process counts them as not done."""
    for window in windows:
        window_files(folder, window)["record"].unlink(missing_ok=True)


def unit_done(records: dict[int, dict[str, Any]], first: int, last: int | None) -> bool:
    """Whether windows `first`..`last` (None: to the end of the video) all have records."""
    window = first
    while window in records:
        if window == last or records[window]["final"]:
            return True
        window += 1
    return False


class WindowWriter:
    """One window's results, written frame by frame into a scratch folder, then published into
    the video's `windows/` folder, its record last (`publish`).

    Objects keep the IDs of the window's own session; the overlay is drawn and encoded here,
    with the same encoder settings in every window, so that the parts join without re-encoding.
    """

    def __init__(
        self,
        window: int,
        scratch: Path,
        size: tuple[int, int],
        fps: Fraction,
        write_tracks: bool,
        times: StageTimes,
        started: float,
    ) -> None:
        self.window = window
        self.size = size  # (H, W)
        self.times = times
        self.started = started  # time.monotonic() when work on the window began, in any process
        self.scratch = {key: scratch / path.name for key, path in window_files(scratch, window).items()}
        self.fps = fps
        self.write_tracks = write_tracks
        self.stack = contextlib.ExitStack()
        self.video: H264Writer | None = None  # opened with the first frame: a window may have none
        self.tracks: TrackWriter | None = None
        self.timestamps: list[float] = []
        self.source_frames: list[int] = []
        self.summaries: dict[int, ObjectTrack] = {}
        self.order: list[int] = []  # object IDs in the order they first appear
        self.shared_objects: list[dict[str, Any]] | None = None
        self.last_objects: list[dict[str, Any]] = []
        self.size_changes = 0
        self.timestamp_discontinuities = 0
        self.frames_behind = 0

    def share(self, detections: Detections) -> None:
        """The objects this window's session sees on the frame it shares with the window before."""
        self.shared_objects = object_records(detections, self.size)

    def add(self, sample: SampledFrame, detections: Detections) -> None:
        """One of the window's own frames and its objects (masks at `size`)."""
        number = len(self.timestamps)
        if self.video is None:
            self.video = self.stack.enter_context(
                H264Writer(self.scratch["video"], self.size[1], self.size[0], self.fps)
            )
            if self.write_tracks:
                self.tracks = self.stack.enter_context(TrackWriter(self.scratch["tracks"], self.scratch["mot"]))
        with self.times.measure("overlay"):
            drawn = draw_overlay(sample.rgb, detections)
        with self.times.measure("encode"):
            self.video.write(drawn)
        with self.times.measure("tracks"):
            objects = object_records(detections, self.size)
            if self.tracks:
                self.tracks.write(number, sample, objects)
            self.order += [obj["id"] for obj in objects if obj["id"] not in self.summaries]
            update_tracks(self.summaries, number, sample.timestamp, detections)
        self.last_objects = objects
        self.timestamps.append(round(sample.timestamp, 6))
        self.source_frames.append(sample.source_index)
        self.size_changes += sample.size_changes
        self.timestamp_discontinuities += sample.timestamp_discontinuities
        self.frames_behind += sample.frames_behind

    def publish(self, folder: Path, facts: dict[str, Any]) -> dict[str, Any]:
        """Close the window's files, move them into `folder`/windows/ and write its record last.
        facts: what the record says besides the window's own results: the `recipe`, the `video`,
        who computed it, and whether the video ends in this window (`final`, `decode_error`).
        Returns the record."""
        self.stack.close()
        produced = {key: self.scratch[key] for key in ("video", "tracks", "mot") if self.scratch[key].exists()}
        listed = {key: file_record(path) for key, path in produced.items()}
        destination = window_files(folder, self.window, {key: entry["sha256"] for key, entry in listed.items()})
        destination["record"].parent.mkdir(parents=True, exist_ok=True)
        for key, path in produced.items():
            publish(path, destination[key])
        outputs = {key: {**entry, "file": destination[key].name} for key, entry in listed.items()}
        record = {
            "status": "complete",
            "window": self.window,
            "positions": list(window_positions(self.window, facts["recipe"]["chunk_frames"])),
            "frames": len(self.timestamps),
            **facts,
            "timestamps": self.timestamps,
            "source_frames": self.source_frames,
            "size_changes": self.size_changes,
            "timestamp_discontinuities": self.timestamp_discontinuities,
            "frames_behind": self.frames_behind,
            "object_order": self.order,
            "objects": [dataclasses.asdict(track) for _, track in sorted(self.summaries.items())],
            "shared_objects": self.shared_objects,
            "last_objects": self.last_objects,
            "outputs": outputs,
            "seconds": round(time.monotonic() - self.started, 3),
            "stage_seconds": self.times.rounded(),
            "completed_at": now_iso(),
        }
        write_json(destination["record"], record)
        return record


def computed_by(shard_index: int, num_shards: int) -> dict[str, Any]:
    """Who computes a window: this job's share, host and process."""
    return {"shard": shard_index, "num_shards": num_shards, "host": socket.gethostname(), "pid": os.getpid()}
