"""Windows as the unit of work: how many a video has, which ones a process computes, and each
window's results on disk, written so that a window is either whole or absent.

A window is a stretch of up to --chunk-frames sampled frames tracked by one SAM3 session
(`sam3.window_of`); which frames it holds follows from their times alone, so any process can
compute any window. Its results go to the video's output folder, under `windows/`, with the IDs
of its own session:

  w00003.mp4            its frames of the overlay video (not the one it shares with window 2)
  w00003_tracks.jsonl   its tracks and MOT rows, frames numbered from 0 within the window
  w00003_mot.txt        (both only with tracks)
  w00003.json           its record, written last: what it holds, and how it joins the window before

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
from fractions import Fraction
from pathlib import Path
from typing import Any

from sam3_pipeline.outputs import (
    ObjectTrack,
    TrackWriter,
    listed_file_problems,
    now_iso,
    object_records,
    publish_all,
    read_record,
    update_tracks,
    write_json,
)
from sam3_pipeline.overlay import draw_overlay
from sam3_pipeline.sam3 import Detections, shared_position
from sam3_pipeline.stages import StageTimes
from sam3_pipeline.video_io import H264Writer, SampledFrame

WINDOWS_FOLDER = "windows"
RECORD_NAME = re.compile(r"w(\d{5,})\.json")
WINDOW_PART = re.compile(r"w\d{5,}\.mp4")


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


def plan_units(windows: int, seekable: bool) -> list[tuple[int, int | None]]:
    """A video's units of work, as (first window, last window or None for "to the end").

    Where frames can be found by seeking, each window is a unit. Elsewhere (MPEG-TS, streams
    without an index) reaching window k means decoding everything before it, so the whole video
    is one unit, which still keeps and reuses its windows one by one."""
    if not seekable:
        return [(0, None)]
    return [(window, window) for window in range(windows - 1)] + [(windows - 1, None)]


def window_files(folder: Path, window: int) -> dict[str, Path]:
    """Where window `window` of the video whose output folder is `folder` keeps its results."""
    base = folder / WINDOWS_FOLDER / f"w{window:05d}"
    return {
        "record": base.with_suffix(".json"),
        "video": base.with_suffix(".mp4"),
        "tracks": base.with_name(f"{base.name}_tracks.jsonl"),
        "mot": base.with_name(f"{base.name}_mot.txt"),
    }


def done_windows(folder: Path, recipe: dict[str, Any] | None = None) -> dict[int, dict[str, Any]]:
    """The complete windows of a video, by number: records that say complete, whose files are
    whole and, when `recipe` is given, that were computed with that recipe (the same source,
    prompts, rate, window size, model); others are as good as missing."""
    records = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder / WINDOWS_FOLDER):
            match = RECORD_NAME.fullmatch(entry.name)
            if not match:
                continue
            record = read_record(Path(entry.path))
            if record.get("status") != "complete" or record.get("window") != int(match[1]):
                continue
            if recipe is not None and record.get("recipe") != recipe:
                continue
            if not listed_file_problems(folder / WINDOWS_FOLDER, record.get("outputs") or {}):
                records[record["window"]] = record
    return records


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
        destination = window_files(folder, self.window)
        destination["record"].parent.mkdir(parents=True, exist_ok=True)
        outputs = publish_all(produced, destination)
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
