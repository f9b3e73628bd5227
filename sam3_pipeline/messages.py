"""What a user sees when something goes wrong: errors that end a run or fail one video, and log lines."""

from __future__ import annotations

import os
import sys

import av
from tqdm import tqdm


class UsageError(Exception):
    """A problem with the command line or environment that stops the whole run (exit 2)."""


class VideoError(Exception):
    """A problem with one input video that a user can fix; it fails that video only."""


def log(message: str) -> None:
    """Print a log line without breaking the progress bars."""
    tqdm.write(message, file=sys.stderr)


def redact(text: str) -> str:
    """Remove the Hugging Face token from a message that may end up on screen or on disk."""
    token = os.environ.get("HF_TOKEN")
    return text.replace(token, "***") if token else text


def one_line(error: BaseException) -> str:
    """An exception as a single line: the message, or the type name when there is none.

    FFmpeg errors carry errno and file name in their text; their plain reason reads better.
    """
    reason = error.strerror if isinstance(error, av.FFmpegError) and error.strerror else str(error)
    return redact(" ".join(reason.split()) or type(error).__name__)
