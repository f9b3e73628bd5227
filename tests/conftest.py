"""Shared fixtures: a tiny offline SAM3 model and synthetic soccer-like videos."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import make_tiny_sam3  # noqa: E402
import process_segmentation as ps  # noqa: E402
from synthetic_video import pitch_frame, write_test_video  # noqa: E402, F401 (shared with the tests)

PROMPTS = ["soccer player", "ball"]

# One thread was several times faster than two on the 2-core CI machine.
torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slow: over about 5 s (whole jobs, several ranks, the full-size model); "
        '`pytest -m "not slow"` is the quick loop (docs/development.md)',
    )

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


def sampled_times(times: Sequence[float], average_interval: float, rate: float = 1.0) -> list[float]:
    """The frame times a sampler at `rate` takes, by the rule docs/how-it-works.md states: for each k, the
    first frame later than k / rate less half a frame interval (the average one, or the interval
    since the frame before where that is shorter); no k gets two frames, and a k inside a gap in
    the video gets none. `times`: every frame's time from the first, in order."""
    taken: list[float] = []
    next_k = 0
    for index, time in enumerate(times):
        spacing = time - times[index - 1] if index and time > times[index - 1] else average_interval
        half = min(spacing, average_interval) / 2
        if time > next_k / rate - half:
            taken.append(time)
            next_k = math.floor((time + half) * rate) + 1
    return taken


def run_cli(args: Sequence[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """main() in this process (the model import is paid once); returns (exit code, stderr)."""
    try:
        code = ps.main([str(arg) for arg in args])
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    return code, capsys.readouterr().err


def segment(inputs: Sequence[Path], output_dir: Path, model_dir: Path, *extra: str) -> list[str]:
    """The arguments of a run over `inputs` with a local model on the CPU."""
    return [*map(str, inputs), "--output-dir", str(output_dir), "--model", str(model_dir), "--device", "cpu", *extra]


def failure_lines(stderr: str) -> list[str]:
    """The lines that report a failure; progress bars and progress logs left out."""
    return [line for line in stderr.splitlines() if line.startswith(("FAILED", "error:"))]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SAM3 saved the way a user would, through the script the README documents."""
    directory = tmp_path_factory.mktemp("tiny-sam3")
    assert make_tiny_sam3.main([str(directory)]) == 0
    return directory


@pytest.fixture
def make_video() -> Callable[..., Path]:
    """Factory: make_video(path, seconds=2, fps=25, size=(160, 96), frame_times=None) -> path."""
    return write_test_video


def yaml_task(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


@pytest.fixture(scope="module")
def venv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The venv running these tests; a stand-in with the same interpreter when there is none."""
    prefix = Path(sys.prefix)
    if (prefix / "bin" / "activate").is_file():
        return prefix
    stand_in = tmp_path_factory.mktemp("venv")
    (stand_in / "bin").mkdir()
    (stand_in / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (stand_in / "bin" / "python").chmod(0o755)
    (stand_in / "bin" / "activate").write_text(f'export PATH="{stand_in}/bin:$PATH"\n')
    return stand_in


@pytest.fixture
def run_block(tmp_path: Path, tiny_model_dir: Path, venv_dir: Path):
    """run_block(yaml_name, output_dir, rank=None, num_jobs=None, **envs) -> (exit status, output)."""

    def run(
        yaml_name: str, output_dir: Path, rank: int | None = None, num_jobs: int | None = None, **envs: str
    ):
        task = yaml_task(yaml_name)
        # One file per call: ranks run side by side, and bash reads its script as it goes.
        script = tmp_path / f"{Path(yaml_name).stem}-run-{rank}-{os.urandom(4).hex()}.sh"
        script.write_text(task["run"])
        env = {key: value for key, value in os.environ.items() if not key.startswith("SKYPILOT_")}
        env.update({key: str(value) for key, value in task["envs"].items() if value is not None})
        env.update(
            OUTPUT_DIR=str(output_dir),
            MODEL=str(tiny_model_dir),
            VENV_DIR=str(venv_dir),
            DEVICE="cpu",  # the YAMLs' default, cuda, fails where no GPU is visible
            BUCKET_LAG="0",  # each rank writes its own folder, where no other's files are to come
            HF_HUB_OFFLINE="1",
            OMP_NUM_THREADS="1",
            PROMPTS=";".join(PROMPTS),
        )
        env.update(envs)
        if rank is not None:
            env.update(SKYPILOT_JOB_RANK=str(rank), SKYPILOT_NUM_JOBS=str(num_jobs))
        result = subprocess.run(
            ["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        return result.returncode, result.stdout + result.stderr

    return run
