"""JSON records and text files written whole or not at all, and read back forgivingly.

Standard library only: `progress.py` runs on any Python 3.10+, a laptop's included, without the
pipeline's dependencies."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any


def partial_path(path: Path) -> Path:
    """A hidden temporary name beside `path`, unique to this writer (pid and a random suffix)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(6).hex()}.partial")


def write_text_atomically(path: Path, text: str) -> None:
    """Replace `path` whole, even while other processes or threads write it too.

    Each writer uses its own temporary file in the same folder (`partial_path`), then renames it
    over `path`: readers see one complete version, the last rename wins.
    """
    partial = partial_path(path)
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_json(path: Path, data: dict[str, Any], indent: int | None = 2) -> None:
    """`write_text_atomically` as JSON; indent=None: on one line, for records read by programs only."""
    separators = None if indent is not None else (",", ":")
    write_text_atomically(path, json.dumps(data, indent=indent, separators=separators) + "\n")


def read_record(path: Path) -> dict[str, Any]:
    """A JSON object this script wrote, or {} when it is absent or unreadable."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
