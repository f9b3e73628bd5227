"""A video's results from its windows: one ID per object across them, the overlay parts joined
into one MP4 without re-encoding, the tracks and MOT rows renumbered, the preview, the metadata.

Whoever sees the last window of a video done assembles it (the job that computed it, or
`--summarize`). Two processes may do so at once: each works in its own scratch folder and
publishes whole files only, and both make the same bytes from the same windows.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sam3_pipeline.files import now_iso, write_json
from sam3_pipeline.outputs import detections_from_records, publish_all, scratch_dir
from sam3_pipeline.overlay import color_hex, object_color, preview_jpeg, preview_picks
from sam3_pipeline.sam3 import Detections, match_objects
from sam3_pipeline.video_io import join_mp4, read_frames
from sam3_pipeline.windows import BrokenWindows, content_problems, drop_windows, window_file


def video_ids(windows: Sequence[dict[str, Any]]) -> list[dict[int, int]]:
    """Per window, {its session's object ID: the object's ID for the whole video}.

    Video IDs start at 1, in the order objects first appear. On the frame a window shares with
    the window before, its objects are matched by mask to that window's on the same frame
    (`match_objects`) and take their IDs, so an object keeps its ID across windows.
    """
    mappings = []
    next_id = 1
    previous: Detections | None = None  # the last frame's objects of the last window with frames
    for record in windows:
        mapping: dict[int, int] = {}
        if record["frames"]:
            if previous is not None and record["shared_objects"] is not None:
                mapping = match_objects(previous, detections_from_records(record["shared_objects"]))
            for obj_id in record["object_order"]:
                if obj_id not in mapping:
                    mapping[obj_id], next_id = next_id, next_id + 1
            last = detections_from_records(record["last_objects"])
            ids = np.array([mapping[int(obj_id)] for obj_id in last.object_ids], dtype=np.int64)
            previous = dataclasses.replace(last, object_ids=ids)
        mappings.append(mapping)
    return mappings


def frame_offsets(windows: Sequence[dict[str, Any]]) -> list[int]:
    """The video's frame number of each window's first frame."""
    return [0, *itertools.accumulate(record["frames"] for record in windows)][:-1]


def rewrite_tracks(
    windows: Sequence[dict[str, Any]], folder: Path, mappings: list[dict[int, int]], tracks: Path, mot: Path
) -> None:
    """The windows' tracks and MOT rows as one file each, with video frame numbers and IDs."""
    with tracks.open("w") as tracks_out, mot.open("w") as mot_out:
        for record, mapping, offset in zip(windows, mappings, frame_offsets(windows), strict=True):
            if not record["frames"]:
                continue
            with window_file(folder, record, "tracks").open() as lines:
                for line in lines:
                    frame = json.loads(line)
                    frame["frame"] += offset
                    for obj in frame["objects"]:
                        obj["id"] = mapping[obj["id"]]
                    tracks_out.write(json.dumps(frame, separators=(",", ":")) + "\n")
            with window_file(folder, record, "mot").open() as rows:
                for row in rows:
                    number, obj_id, rest = row.split(",", 2)
                    mot_out.write(f"{int(number) + offset},{mapping[int(obj_id)]},{rest}")


def object_summaries(windows: Sequence[dict[str, Any]], mappings: list[dict[int, int]]) -> list[dict[str, Any]]:
    """Each object's entry in the metadata, from the windows' summaries of their own objects.

    `spans`: per window it is seen in, its first and last frame there and its overlay colour
    there (the overlay is drawn with each window's own IDs, so the colour can change between
    windows), spans of one colour that follow on without a gap joined: what the results page's
    timeline draws."""
    merged: dict[int, dict[str, Any]] = {}
    for record, mapping, offset in zip(windows, mappings, frame_offsets(windows), strict=True):
        for track in record["objects"]:
            obj_id = mapping[track["object_id"]]
            entry = merged.get(obj_id)
            if entry is None:
                merged[obj_id] = entry = {
                    "id": obj_id,
                    "prompt": track["prompt"],
                    "first_frame": offset + track["first_frame"],
                    "first_timestamp": track["first_time"],
                    "frames_present": 0,
                    "score": 0.0,
                    "score_sum": 0.0,
                    "spans": [],
                }
            entry["last_frame"] = offset + track["last_frame"]
            entry["last_timestamp"] = track["last_time"]
            span = {
                "first_frame": offset + track["first_frame"],
                "last_frame": offset + track["last_frame"],
                "color": color_hex(object_color(track["object_id"])),
            }
            before = entry["spans"][-1] if entry["spans"] else None
            if before and before["color"] == span["color"] and before["last_frame"] + 1 == span["first_frame"]:
                before["last_frame"] = span["last_frame"]  # one bar where nothing changes between windows
            else:
                entry["spans"].append(span)
            entry["frames_present"] += track["frames_present"]
            entry["score"] = max(entry["score"], track["max_score"])
            entry["score_sum"] += track["score_sum"]
    return [
        {
            "id": entry["id"],
            "prompt": entry["prompt"],
            "first_frame": entry["first_frame"],
            "last_frame": entry["last_frame"],
            "first_timestamp": entry["first_timestamp"],
            "last_timestamp": entry["last_timestamp"],
            "frames_present": entry["frames_present"],
            "score": round(entry["score"], 4),
            "mean_score": round(entry["score_sum"] / entry["frames_present"], 4),
            "spans": entry["spans"],
        }
        for _, entry in sorted(merged.items())
    ]


def preview_frames(windows: Sequence[dict[str, Any]], folder: Path) -> list[tuple[float, np.ndarray]]:
    """The frames the preview shows (`preview_picks`), decoded from the windows' overlay parts."""
    offsets = frame_offsets(windows)
    picks = collections.defaultdict(list)  # window index -> frame numbers within it
    for number in preview_picks(sum(record["frames"] for record in windows)):
        index = bisect.bisect_right(offsets, number) - 1  # past windows without frames, whose offset repeats
        picks[index].append(number - offsets[index])
    frames = []
    for index, numbers in sorted(picks.items()):
        record = windows[index]
        decoded = read_frames(window_file(folder, record, "video"), numbers)
        frames += [(record["timestamps"][number], decoded[number]) for number in numbers]
    return frames


def assemble(paths: dict[str, Path], windows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Join a video's windows (0 up to the one that ends it, all computed alike) into its output
    files, published whole; returns its metadata, which the caller writes last. Raises
    BrokenWindows, after dropping their records, for windows whose files are not as recorded."""
    started = time.monotonic()
    folder = paths["folder"]
    # Sizes were checked when the windows were listed; their bytes are read here anyway. Broken
    # ones are dropped at once, so that every process counts them as not done from now on.
    broken = {record["window"]: problems for record in windows if (problems := content_problems(folder, record))}
    if broken:
        drop_windows(folder, broken)
        raise BrokenWindows(broken)
    facts = windows[0]["video"]
    products = ["video", "preview", *(["tracks", "mot"] if windows[0]["recipe"]["tracks"] else [])]
    mappings = video_ids(windows)
    with scratch_dir() as scratch:
        local = {key: Path(scratch) / paths[key].name for key in products}
        join_mp4([window_file(folder, record, "video") for record in windows if record["frames"]], local["video"])
        if "tracks" in local:
            rewrite_tracks(windows, folder, mappings, local["tracks"], local["mot"])
        size = (facts["height"], facts["width"])
        local["preview"].write_bytes(preview_jpeg(preview_frames(windows, folder), size))
        outputs = publish_all(local, paths)

    final = windows[-1]
    objects = object_summaries(windows, mappings)
    frames = sum(record["frames"] for record in windows)
    discontinuities = sum(record["timestamp_discontinuities"] for record in windows)
    stage_seconds: collections.Counter[str] = collections.Counter()
    for record in windows:
        stage_seconds.update(record["stage_seconds"])
    seconds = sum(record["seconds"] for record in windows)
    prompts = windows[0]["recipe"]["prompts"]
    return {
        "status": "complete",
        **facts,
        "size_changes": sum(record["size_changes"] for record in windows),
        "timestamp_discontinuities": discontinuities,
        "frames_behind": sum(record["frames_behind"] for record in windows),
        "plan": windows[0]["plan"],
        "chunking": {
            "chunk_frames": windows[0]["recipe"]["chunk_frames"],
            "windows": len(windows),
            "frames_per_window": [record["frames"] for record in windows],
        },
        "windows": [
            {
                "window": record["window"],
                "first_frame": offset,
                "frames": record["frames"],
                "positions": record["positions"],
                "computed_by": record["computed_by"],
                "seconds": record["seconds"],
                "completed_at": record["completed_at"],
            }
            for record, offset in zip(windows, frame_offsets(windows), strict=True)
        ],
        "frames_processed": frames,
        # estimated from the container's duration, which does not span restarts
        "frames_expected": None if discontinuities else facts["frames_expected"],
        "decode_error": final["decode_error"],
        "sampled_timestamps": [t for record in windows for t in record["timestamps"]],
        "sampled_frame_indices": [i for record in windows for i in record["source_frames"]],
        "prompts": prompts,
        "objects_detected": len(objects),
        "objects_per_prompt": {prompt: sum(obj["prompt"] == prompt for obj in objects) for prompt in prompts},
        "objects": objects,
        "model": windows[0]["recipe"]["model"],
        "device": windows[0]["device"],
        "dtype": windows[0]["dtype"],
        "postprocessing": windows[0]["postprocessing"],
        "processing_seconds": round(seconds, 3),
        "assembly_seconds": round(time.monotonic() - started, 3),
        "pipeline": windows[0]["pipeline"],
        "stage_seconds": {stage: round(value, 3) for stage, value in stage_seconds.items()},
        "frames_per_second": round(frames / seconds, 3) if seconds > 0 else None,
        "output_video": str(paths["video"]),
        "outputs": outputs,
        "output_codec": "h264",
        "completed_at": now_iso(),
    }


def assemble_and_record(paths: dict[str, Path], windows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`assemble`, then write the metadata, last (its presence means complete), and remove an
    old error record, which the complete metadata outranks. Returns the metadata."""
    metadata = assemble(paths, windows)
    write_json(paths["metadata"], metadata)
    with contextlib.suppress(OSError):
        paths["error"].unlink(missing_ok=True)
    return metadata
