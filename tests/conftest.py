"""Shared fixtures: a tiny offline SAM3 model and synthetic soccer-like videos."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import make_tiny_sam3  # noqa: E402

# One thread was several times faster than two on the 2-core CI machine.
torch.set_num_threads(1)

PITCH_GREEN = (40, 140, 60)


def run_in_skypilot_venv(script: str, cases: list[dict[str, Any]], home: Path) -> list[Any]:
    """Run tests/<script> with SkyPilot's interpreter ($SKYPILOT_PYTHON, else .venv-sky: its click
    pin conflicts with transformers', see tests/requirements-sky.txt), `cases` as JSON on stdin
    and `home` as HOME (`import sky` writes ~/.sky). Returns what it prints, parsed as JSON."""
    python = Path(os.environ.get("SKYPILOT_PYTHON") or REPO / ".venv-sky" / "bin" / "python")
    if not python.exists():
        pytest.fail(
            f"SkyPilot interpreter not found: {python}. These tests need `skypilot` (PyPI) in a separate venv: "
            "python -m venv .venv-sky && .venv-sky/bin/pip install -r tests/requirements-sky.txt, "
            "or set SKYPILOT_PYTHON."
        )
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HOME=str(home), SKYPILOT_DISABLE_USAGE_COLLECTION="1")
    result = subprocess.run(
        [str(python), str(REPO / "tests" / script)],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SAM3 saved the way a user would, through the script the README documents."""
    directory = tmp_path_factory.mktemp("tiny-sam3")
    assert make_tiny_sam3.main([str(directory)]) == 0
    return directory


def pitch_frame(index: int, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB: a green pitch, a white line, three players and a ball that move with `index`."""
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[:] = PITCH_GREEN
    frame[:, width // 2 - 1 : width // 2 + 1] = 255
    unit = max(height // 12, 2)
    for player, color in enumerate([(200, 30, 30), (30, 30, 200), (200, 30, 30)]):
        x = (index * (player + 2) * 3 + player * width // 3) % max(width - unit, 1)
        y = height // 4 + player * height // 5
        frame[y : y + 2 * unit, x : x + unit] = color
    bx = (index * 5) % max(width - unit // 2, 1)
    frame[height - 2 * unit : height - 2 * unit + unit // 2, bx : bx + unit // 2] = 255
    return frame


def write_test_video(
    path: Path,
    seconds: float = 2.0,
    fps: Fraction | float | str = 25,
    size: tuple[int, int] = (160, 96),
    frame_times: Sequence[float] | None = None,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
) -> Path:
    """Write a video (H.264 MP4 by default) of `pitch_frame`s.

    size is (width, height). frame_times (seconds), when given, makes a variable-frame-rate file
    with those presentation times (millisecond time base) instead of a constant `fps`.
    """
    width, height = size
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if frame_times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
            pts = [round(t * 1000) for t in frame_times]
        else:
            pts = list(range(round(seconds * rate)))
        for index, value in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(pitch_frame(index, width, height), format="rgb24")
            frame.pts = value
            if frame_times is not None:
                frame.time_base = Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


@pytest.fixture
def make_video() -> Callable[..., Path]:
    """Factory: make_video(path, seconds=2, fps=25, size=(160, 96), frame_times=None) -> path."""
    return write_test_video
