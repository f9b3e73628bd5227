"""Results on disk (or a bucket mount): per-object records, tracks files, metadata, and writing so that no
reader sees a file half-written."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pycocotools import mask as coco_mask

from sam3_pipeline.files import partial_path, read_record
from sam3_pipeline.messages import UsageError, one_line
from sam3_pipeline.sam3 import Detections
from sam3_pipeline.tracks import box_mask
from sam3_pipeline.video_io import SampledFrame

if TYPE_CHECKING:  # dataset reads output names: an import at run time would be circular
    from sam3_pipeline.dataset import Video

SCRATCH_PREFIX = "sam3-"
# A `.partial` file this much older than the run is a dead writer's (`remove_stale_partials`).
STALE_PARTIAL_SECONDS = 600


@dataclasses.dataclass
class ObjectTrack:
    """Running summary of one object ID across a video."""

    object_id: int
    prompt: str
    first_frame: int
    last_frame: int
    first_time: float
    last_time: float
    frames_present: int = 0
    max_score: float = 0.0
    score_sum: float = 0.0


def update_tracks(
    tracks: dict[int, ObjectTrack], frame_number: int, timestamp: float, detections: Detections
) -> None:
    """Fold one frame's objects into the per-object summaries."""
    for obj_id, prompt, score in zip(
        detections.object_ids, detections.prompts, detections.scores, strict=True
    ):
        track = tracks.setdefault(
            int(obj_id), ObjectTrack(int(obj_id), prompt, frame_number, frame_number, timestamp, timestamp)
        )
        track.last_frame, track.last_time = frame_number, timestamp
        track.frames_present += 1
        track.max_score = max(track.max_score, float(score))
        track.score_sum += float(score)



def scratch_dir() -> tempfile.TemporaryDirectory[str]:
    """A local folder for one video's outputs while they are written, named after this process
    so that a later run can tell when its owner is gone (`remove_dead_scratch`)."""
    return tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def remove_dead_scratch() -> list[Path]:
    """Remove the scratch folders (`scratch_dir`) of processes that no longer run on this machine:
    a run killed with SIGKILL leaves one, with up to a whole video's outputs in it. Returns them."""
    removed = []
    root = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            owner = re.fullmatch(rf"{re.escape(SCRATCH_PREFIX)}(\d+)-\w+", entry.name)
            if owner and entry.is_dir(follow_symlinks=False) and not process_exists(int(owner[1])):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(root / entry.name)
    return removed


def remove_stale_partials(folders: Iterable[Path], run_started: float) -> list[Path]:
    """Remove the hidden `.partial` files (`partial_path`) in `folders` that were last written
    STALE_PARTIAL_SECONDS or more before this run started: writers killed mid-copy leave them.

    Their names carry the writer's pid, but on a bucket shared by several workers a pid says
    nothing; their age does: a live writer keeps its file's modification time current. The
    margin keeps clear of another job writing into the same folder right now. Returns them.
    """
    removed = []
    cutoff = run_started - STALE_PARTIAL_SECONDS
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:  # not there yet
            continue
        for entry in entries:
            if not (entry.name.startswith(".") and entry.name.endswith(".partial")):
                continue
            with contextlib.suppress(OSError):  # gone already, or not ours to remove
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime <= cutoff:
                    os.unlink(entry.path)
                    removed.append(Path(folder) / entry.name)
    return removed


def publish(local_file: Path, destination: Path) -> None:
    """Move a finished file into place so that readers never see it half-written.

    The destination may be a FUSE-mounted bucket: copy under a hidden temporary name first, then
    rename, which such mounts do support.
    """
    partial = partial_path(destination)
    try:
        shutil.move(local_file, partial)
        os.replace(partial, destination)
    finally:
        partial.unlink(missing_ok=True)


def publish_all(local: dict[str, Path], destinations: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """`publish` each local file to its destination of the same kind; returns each one's
    `file_record`, taken before the move, for the record written after them."""
    records = {key: file_record(path) for key, path in local.items()}
    for key, path in local.items():
        publish(path, destinations[key])
    return records




def coco_rle(box: np.ndarray, crop: np.ndarray, size: tuple[int, int]) -> dict[str, Any]:
    """A box-cropped mask as COCO's compressed RLE of the full (H, W) frame.

    The same string `pycocotools.mask.encode` gives for the full mask, computed from the crop:
    COCO runs go down columns, so the columns left and right of the box are single zero runs.
    """
    height, width = size
    x0, y0, x1, y1 = map(int, box)
    columns = np.zeros((height, crop.shape[1]), dtype=np.uint8)
    columns[y0 : y1 + 1] = crop
    flat = columns.ravel(order="F")
    runs = np.diff(np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]]))
    if flat[0]:  # COCO runs start with zeros
        runs = np.concatenate([[0], runs])
    runs[0] += x0 * height
    trailing = (width - 1 - x1) * height
    if not flat[-1]:
        runs[-1] += trailing
    elif trailing:
        runs = np.concatenate([runs, [trailing]])
    encoded = coco_mask.frPyObjects({"size": [height, width], "counts": runs.tolist()}, height, width)
    return {"size": [height, width], "counts": encoded["counts"].decode("ascii")}


def object_records(detections: Detections, size: tuple[int, int]) -> list[dict[str, Any]]:
    """A frame's objects as the tracks file lists them: ID, prompt, score, box (XYXY inclusive),
    area and the full-frame mask as COCO RLE. size: (H, W) of the frame."""
    return [
        {
            "id": int(obj_id),
            "prompt": prompt,
            "score": round(float(score), 4),
            "box": [int(v) for v in box],
            "area": int(np.count_nonzero(crop)),
            "mask": coco_rle(box, crop, size),
        }
        for obj_id, prompt, score, box, crop in zip(
            detections.object_ids,
            detections.prompts,
            detections.scores,
            detections.boxes,
            detections.masks,
            strict=True,
        )
    ]


def detections_from_records(objects: Sequence[dict[str, Any]]) -> Detections:
    """The inverse of `object_records`, each mask cut back to its box (scores as rounded there)."""
    if not objects:
        return Detections.empty()
    boxes = np.array([obj["box"] for obj in objects], dtype=np.int64)
    masks = [box_mask(obj["mask"], box) for obj, box in zip(objects, boxes.tolist(), strict=True)]
    return Detections(
        object_ids=np.array([obj["id"] for obj in objects], dtype=np.int64),
        prompts=[obj["prompt"] for obj in objects],
        scores=np.array([obj["score"] for obj in objects], dtype=np.float32),
        boxes=boxes,
        masks=masks,
    )


def mot_rows(frame_number: int, objects: Sequence[dict[str, Any]]) -> str:
    """MOTChallenge rows (frame, id, bb_left, bb_top, bb_width, bb_height, conf, -1, -1, -1) of one
    frame's `object_records`; frames are numbered from 1 there."""
    return "".join(
        f"{frame_number + 1},{obj['id']},{x0},{y0},{x1 - x0 + 1},{y1 - y0 + 1},{obj['score']:.4f},-1,-1,-1\n"
        for obj in objects
        for x0, y0, x1, y1 in [obj["box"]]
    )


def track_line(frame_number: int, source_frame: int, timestamp: float, objects: Sequence[dict[str, Any]]) -> str:
    """One line of the tracks file."""
    record = {"frame": frame_number, "source_frame": source_frame, "timestamp": round(timestamp, 6), "objects": objects}
    return json.dumps(record, separators=(",", ":")) + "\n"


class TrackWriter:
    """Stream per-frame tracks to two local files: JSON lines with COCO RLE masks, and
    MOTChallenge rows (`mot_rows`)."""

    def __init__(self, jsonl_path: Path, mot_path: Path) -> None:
        self.jsonl = jsonl_path.open("w")
        self.mot = mot_path.open("w")

    def write(self, frame_number: int, sample: SampledFrame, objects: Sequence[dict[str, Any]]) -> None:
        """objects: the frame's `object_records`."""
        self.jsonl.write(track_line(frame_number, sample.source_index, sample.timestamp, objects))
        self.mot.write(mot_rows(frame_number, objects))

    def close(self) -> None:
        self.jsonl.close()
        self.mot.close()

    def __enter__(self) -> TrackWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def output_paths(output_dir: Path, key: str) -> dict[str, Path]:
    """Where the results of the video with `key` go: OUTPUT_DIR/train/10001/en/en_segmented.mp4, ..."""
    folder = output_dir / key
    name = folder.name
    return {
        "folder": folder,
        "video": folder / f"{name}_segmented.mp4",
        "tracks": folder / f"{name}_tracks.jsonl",
        "mot": folder / f"{name}_mot.txt",
        "preview": folder / f"{name}_preview.jpg",
        "metadata": folder / f"{name}_metadata.json",
        "error": folder / f"{name}_error.json",
    }



def file_record(path: Path) -> dict[str, Any]:
    """An output as the metadata lists it: its name, size and SHA-256 (to check a copy with)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def output_problems(folder: Path, metadata: dict[str, Any]) -> list[str]:
    """What is wrong with the outputs a video's metadata lists: [] when each file is in `folder`
    with its listed size.

    The metadata is written last, but a bucket mount uploads several files at once, so a worker
    lost at the wrong moment can leave the metadata without a file it lists, or with part of one.
    Sizes need only a stat, which is cheap even on a bucket mount; the checksums are for copies.
    """
    outputs = metadata.get("outputs")
    if not isinstance(outputs, dict) or "video" not in outputs:
        return ["the metadata lists no outputs"]
    return listed_file_problems(folder, outputs)


def listed_file_problems(folder: Path, outputs: dict[str, Any], contents: bool = False) -> list[str]:
    """What is wrong with files listed as {kind: `file_record`}: [] when each is in `folder` with
    its listed size and, with `contents`, its listed SHA-256 (which reads every byte)."""
    problems = []
    for key, entry in outputs.items():
        listed = isinstance(entry, dict) and isinstance(entry.get("file"), str)
        if not (listed and isinstance(entry.get("bytes"), int)):
            problems.append(f"the metadata lists no size for its {key}")
            continue
        path = folder / entry["file"]
        try:
            size = path.stat().st_size
            if size == entry["bytes"] and contents and file_record(path)["sha256"] != entry.get("sha256"):
                problems.append(f"{entry['file']} does not have its listed SHA-256")
        except OSError:
            problems.append(f"{entry['file']} is missing")
            continue
        if size != entry["bytes"]:
            problems.append(f"{entry['file']} has {size} of its {entry['bytes']} bytes")
    return problems


def source_change(metadata: dict[str, Any], video: Video) -> str | None:
    """How the input now at a key differs from the one its results were made from, or None when
    it is the same or not known (metadata written before it recorded the source's size)."""
    name = metadata.get("source_name", metadata.get("video_name"))
    if isinstance(name, str) and name != video.path.name:
        return f"made from {name}, not {video.path.name}"
    size = metadata.get("source_bytes")
    if isinstance(size, int) and video.size is not None and size != video.size:
        return f"made from a file of {size} bytes, {video.path.name} has {video.size}"
    return None


def written_within(record: dict[str, Any], seconds: float) -> bool:
    """Whether a record that this script stamped (`completed_at`) was written less than `seconds`
    ago. On a bucket a worker sees another's files 10-20 s late, and not all at once: a result that
    young which misses a file is still arriving, not broken."""
    try:
        written = datetime.datetime.fromisoformat(record["completed_at"])
    except (KeyError, TypeError, ValueError):
        return False
    if written.tzinfo is None:
        return False
    return (datetime.datetime.now(datetime.timezone.utc) - written).total_seconds() < seconds


def completed_metadata(paths: dict[str, Path]) -> dict[str, Any]:
    """The video's metadata if it says complete and every output it lists is whole, else {}."""
    metadata = read_record(paths["metadata"])
    complete = metadata.get("status") == "complete" and not output_problems(paths["folder"], metadata)
    return metadata if complete else {}


def check_output_dir(output_dir: Path) -> None:
    """Fail before loading the model when results could not be written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UsageError(f"{output_dir}: output folder is not writable: {one_line(error)}") from None
