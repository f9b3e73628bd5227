"""The wait at the end of a job's share: other jobs' last windows, seen late through the bucket."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sam3_pipeline.computing import assemble_if_ready
from sam3_pipeline.dataset import Video
from sam3_pipeline.files import read_record
from sam3_pipeline.messages import log
from sam3_pipeline.options import RunSettings
from sam3_pipeline.outputs import completed_metadata
from sam3_pipeline.planning import usable

POLL_SECONDS = 5.0  # how often a job that waits for other jobs' windows looks again


def wait_for_other_shares(
    waiting: Sequence[Video],
    todo: Sequence[Video],
    paths_of: dict[Video, dict[str, Path]],
    settings: RunSettings,
    bucket_lag: float,
    fail: Callable[[Video, BaseException], None],
) -> tuple[list[Video], list[Video]]:
    """At the end of a job's share (--num-shards > 1): wait `bucket_lag` seconds, as long as the
    bucket may take to show this worker what other jobs wrote before this one ended, and assemble
    the `waiting` videos whose last windows that brings. Whichever job of a launch ends last has
    then seen every other job's windows, so its assembly and the summary after it leave no video
    unassembled and say so, however close together the jobs ended. The wait ends early when every
    video of `todo` (those that were not complete) is complete here: nothing more can come.
    Returns the videos complete and those still waiting; `fail` records each that failed."""
    started = time.monotonic()
    assembled: list[Video] = []
    left = list(waiting)
    unfinished = collections.deque(todo)  # checked in order, each until it is complete: a poll stops at the first that is not
    log(f"wait up to {bucket_lag:g} s for windows of other jobs (the bucket shows them late): {len(left)} videos")
    while True:
        for video in list(left):
            paths = paths_of[video]
            try:
                metadata = read_record(paths["metadata"])
                if usable(metadata, video, paths["folder"], bucket_lag) or assemble_if_ready(
                    video, paths, settings, 0, announce=False
                ):
                    left.remove(video)
                    assembled.append(video)
            except Exception as error:  # one video's trouble never stops the others
                left.remove(video)
                fail(video, error)
        while unfinished and completed_metadata(paths_of[unfinished[0]]):
            unfinished.popleft()
        remaining = started + bucket_lag - time.monotonic()
        if remaining <= 0 or not unfinished:
            break
        time.sleep(min(POLL_SECONDS, remaining))
    still = f", {len(left)} still waiting for jobs that are running" if left else ""
    log(f"waited {time.monotonic() - started:.1f} s (GPU idle): {len(assembled)} videos complete{still}")
    return assembled, left
