"""A bucket that pool workers see late, for running ranks side by side as on a pool.

Each worker has its own view of the output folder (a local folder it writes to and reads from):
its own writes show there at once, as on a bucket mount. A copier thread watches every view;
a whole file that appears or changes in one view (the script writes every file under a temporary
name and renames it) is uploaded to the bucket at once and shown in every other view `lag` seconds
later; a file removed from one view is removed from the bucket at once and from the others `lag`
seconds later. That is SkyPilot's MOUNT_CACHED as shared/notes/pool-buckets.md measures it
(rclone uploads after close; other nodes list with a 10 s directory cache), with the lag set
longer than the closing `--summarize` takes to start, which hid the problem before.

`bucket` holds what the workers uploaded, in upload order, so it is what a user sees once every
job has ended and SkyPilot's upload wait has passed. `flush()` shows every pending change in
every view, as time would.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

POLL_SECONDS = 0.1


@dataclass
class Change:
    at: float  # time.monotonic() when it was seen in its view
    source: int  # the view that made it
    path: str  # relative to the output folder
    content: bytes | None  # None: removed


def is_temporary(name: str) -> bool:
    """The script's files in the making (`.x.<pid>.<random>.partial`, `.write-test-...`) and the
    copier's own: never whole, never copied."""
    return name.startswith(".")


def scan(folder: Path) -> dict[str, tuple[int, int]]:
    """Every whole file below `folder`: relative path -> (mtime_ns, size)."""
    found = {}
    for parent, _, files in os.walk(folder):
        for name in files:
            if is_temporary(name):
                continue
            path = os.path.join(parent, name)
            try:
                status = os.stat(path)
            except OSError:  # renamed over or removed meanwhile: seen on the next poll
                continue
            found[os.path.relpath(path, folder)] = (status.st_mtime_ns, status.st_size)
    return found


class LaggingBucket:
    def __init__(self, root: Path, workers: int, lag: float) -> None:
        self.bucket = root / "bucket"
        self.views = [root / f"worker{index}" for index in range(workers)]
        for folder in (self.bucket, *self.views):
            folder.mkdir(parents=True)
        self.lag = lag
        self.known = [dict[str, tuple[int, int]]() for _ in self.views]
        self.pending: list[Change] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.copy, daemon=True)

    def __enter__(self) -> LaggingBucket:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        self.thread.join()

    def copy(self) -> None:
        while not self.stopping.wait(POLL_SECONDS):
            with self.lock:
                self.watch()
                self.deliver(time.monotonic() - self.lag)

    def flush(self) -> None:
        """Show every change made so far in every view: the bucket after its lag has passed."""
        with self.lock:
            self.watch()
            self.deliver(float("inf"))

    def watch(self) -> None:
        """Upload what each view changed since the last look, and queue it for the others."""
        now = time.monotonic()
        for index, view in enumerate(self.views):
            current = scan(view)
            for path, stamp in current.items():
                if self.known[index].get(path) == stamp:
                    continue
                try:
                    content = (view / path).read_bytes()
                except OSError:
                    continue
                self.known[index][path] = stamp
                self.upload(Change(now, index, path, content))
            for path in set(self.known[index]) - set(current):
                del self.known[index][path]
                self.upload(Change(now, index, path, None))

    def upload(self, change: Change) -> None:
        write(self.bucket / change.path, change.content)
        self.pending.append(change)

    def deliver(self, before: float) -> None:
        """Show the changes made before `before` in every view but their own, oldest first. A view
        that changed the same file itself since keeps its own version, as a mount keeps a file it
        is still uploading."""
        due = [change for change in self.pending if change.at <= before]
        self.pending = [change for change in self.pending if change.at > before]
        for change in due:
            for index, view in enumerate(self.views):
                if index == change.source or any(
                    later.source == index and later.path == change.path and later.at > change.at
                    for later in self.pending + due
                ):
                    continue
                write(view / change.path, change.content)
                if change.content is None:
                    self.known[index].pop(change.path, None)
                else:
                    status = (view / change.path).stat()
                    self.known[index][change.path] = (status.st_mtime_ns, status.st_size)


def write(path: Path, content: bytes | None) -> None:
    """Replace `path` whole (a reader never sees part of it), or remove it for None."""
    if content is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.copier")
    temporary.write_bytes(content)
    os.replace(temporary, path)
