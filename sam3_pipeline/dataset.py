"""The videos to process: files and folders as given, keyed by their path in the dataset, and this
job's share of their windows."""

from __future__ import annotations

import dataclasses
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path

from sam3_pipeline.messages import UsageError, log, one_line
from sam3_pipeline.outputs import output_paths
from sam3_pipeline.windows import WINDOW_PART, WINDOWS_FOLDER

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts"})
# A listed file whose size cannot be read (a bucket mount's I/O error) is tried again 0.5 and 1 s later.
LIST_ATTEMPTS, LIST_RETRY_SECONDS = 3, 0.5


class ListingError(Exception):
    """A folder or a listed file this job cannot read where other jobs may: the share it would make
    from what it did list would not be theirs, so it makes none."""


@dataclasses.dataclass(frozen=True)
class Video:
    """One input video and the key that names its results."""

    path: Path
    key: str  # "/"-separated path inside the folder it was found in, without extension: "train/10001/en"
    size: int | None  # bytes when listed; None when it is not a file (it then fails with its own record)


def is_hidden(name: str) -> bool:
    """Dot files and folders, and the __MACOSX folder of zips made on a Mac (its `._x.mp4` files
    are resource forks, not videos)."""
    return name.startswith(".") or name == "__MACOSX"


def regular_file_size(path: Path) -> int | None:
    """The size of a regular file (following symlinks), or None when `path` is something else.
    OSError where it cannot be read."""
    status = path.stat()
    return status.st_size if stat.S_ISREG(status.st_mode) else None


def file_size(path: Path) -> int | None:
    """The size of a regular file given as such, or None when it is not one or cannot be read (it
    then fails as a video, with its own error record)."""
    try:
        return regular_file_size(path)
    except OSError:
        return None


def listed_size(path: Path) -> int | None:
    """The size of a file a folder's listing showed, or None when it is not a regular file (a
    folder, a socket, a symlink to nothing: the same for every job). A size that cannot be read
    (a bucket mount's I/O error; the file gone since the listing) is tried again, then
    ListingError."""
    for attempt in range(1, LIST_ATTEMPTS + 1):
        try:
            return regular_file_size(path)
        except FileNotFoundError:
            if path.is_symlink():  # a symlink to nothing
                return None
            problem = "listed, then not found"
        except OSError as error:
            problem = one_line(error)
        if attempt < LIST_ATTEMPTS:
            time.sleep(LIST_RETRY_SECONDS * attempt)
    raise ListingError(f"{path}: {problem} ({LIST_ATTEMPTS} reads)")


def refuse_unlistable(error: OSError) -> None:
    raise ListingError(f"{error.filename}: {one_line(error)}")


def find_videos(folder: Path, output_dir: Path) -> list[Video]:
    """The videos below `folder`, sorted by path, keyed by their path inside it.

    Results are never inputs: `output_dir` is not searched where it lies below `folder`, and where
    `folder` is `output_dir` or lies in it, the result videos there (`<name>/<name>_segmented.mp4`)
    are left out, and so are the overlay parts of their windows (`<name>/windows/w00000.mp4`). So are
    hidden files and folders. Symlinked folders are not followed (as
    `Path.rglob`); symlinked files are. ListingError where a folder below or a listed file's size
    cannot be read: every job lists every folder to make the same split.
    """
    # Compared resolved (symlinks, `..`); the folders walked are real ones, so `root / inside` is theirs.
    root, results = folder.resolve(), output_dir.resolve()
    in_output = results == root or results in root.parents
    skip = results.relative_to(root) if root in results.parents else None
    videos = []
    for parent, folders, files in os.walk(folder, onerror=refuse_unlistable):
        here, inside = Path(parent), Path(os.path.relpath(parent, folder))
        folders[:] = [name for name in folders if not is_hidden(name) and inside / name != skip]
        result = output_paths(here.parent, here.name)["video"].name if in_output else None
        windows = in_output and here.name == WINDOWS_FOLDER  # a video's windows (`windows.window_files`)
        for name in files:
            path = here / name
            if is_hidden(name) or name == result or path.suffix.lower() not in VIDEO_EXTENSIONS:
                continue
            if windows and WINDOW_PART.fullmatch(name):
                continue
            size = listed_size(path)
            if size is not None:
                videos.append(Video(path, (inside / name).with_suffix("").as_posix(), size))
    return sorted(videos, key=lambda video: video.path)


def collect_videos(inputs: Sequence[Path], output_dir: Path) -> list[Video]:
    """Files as given (keyed by name without extension), folders expanded to their videos
    (`find_videos`: never results in `output_dir`), each video once.

    A hidden file given as such is ignored. A path that does not exist is kept, so that it fails as
    a video with its own error record.
    """
    videos: dict[str, Video] = {}  # by absolute path, the first key found for it
    for path in inputs:
        if path.is_dir():
            found = find_videos(path, output_dir)
            if not found:
                raise UsageError(f"{path}: folder has no video files ({', '.join(sorted(VIDEO_EXTENSIONS))})")
        elif is_hidden(path.name) or "__MACOSX" in path.parts:
            log(f"ignore {path}: a hidden file (such as macOS's ._ files), not a video")
            continue
        else:
            found = [Video(path, path.stem, file_size(path))]
        for video in found:
            videos.setdefault(os.path.abspath(video.path), video)
    keys: dict[str, Video] = {}
    for video in videos.values():
        if video.key in keys:
            raise UsageError(
                f"{video.path} and {keys[video.key].path} would both write to <output-dir>/{video.key}/: "
                "give the folder that holds both (their keys then include their own folders), "
                "or give each its own --output-dir"
            )
        keys[video.key] = video
    return list(videos.values())


@dataclasses.dataclass(frozen=True)
class Unit:
    """Windows of one video that one process computes in one pass (`windows.plan_units`)."""

    video: Video
    first: int  # window
    last: int | None  # None: on to the end of the video
    weight: int  # the sampled frames it is expected to hold: what shares are balanced by


def assign_units(units: Sequence[Unit], num_shards: int) -> list[int]:
    """The shard of each unit, in their order: heaviest first to the least-loaded shard.

    Every job plans the same units from the same files (their listing and their containers'
    durations), so the split is deterministic (ties go by key, then window): a recovered job with
    the same index takes the same units, every unit lands in exactly one shard, and no shard
    exceeds the ideal load by more than one unit (one window, or one short video).
    """
    loads = [0] * num_shards
    shards = [0] * len(units)

    def heaviest_first(index: int) -> tuple[int, str, int]:
        return -units[index].weight, units[index].video.key, units[index].first

    for index in sorted(range(len(units)), key=heaviest_first):
        shard = min(range(num_shards), key=lambda candidate: (loads[candidate], candidate))
        loads[shard] += units[index].weight
        shards[index] = shard
    return shards

