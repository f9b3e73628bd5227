"""The torch step of the pool's setup, run by bash as written in sam3-pool.yaml, per NVIDIA driver.

A worker must get a PyTorch build its driver can run, or fail at setup: the default torch wheel is
the CUDA 13.0 build (driver >= 580), and with an older driver it quietly runs on the CPU. The step
runs with a PATH that holds only stand-ins and the few commands it uses: `nvidia-smi` prints a
driver version (or fails, or is missing) and `uv` writes its arguments into a file.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "# --- torch", "# --- end torch ---"
INDEX = "https://download.pytorch.org/whl/"
SYSTEM_COMMANDS = ["grep"]  # what the step needs besides bash, nvidia-smi and uv

UV = f"""#!{sys.executable}
import os, sys
open(os.environ["UV_ARGS"], "w").write("\\n".join(sys.argv[1:]))
"""


def torch_step() -> str:
    """The torch step of the pool's setup, with the setup's own shell options."""
    lines = yaml.safe_load((REPO / "sam3-pool.yaml").read_text())["setup"].splitlines()
    assert lines[0] == "set -euo pipefail", "the setup should start with its shell options"
    begin = next(i for i, line in enumerate(lines) if line.startswith(BEGIN))
    end = lines.index(END)
    return "\n".join([lines[0], *lines[begin : end + 1]]) + "\n"


def torch_requirements() -> list[str]:
    """The torch and torchvision lines of requirements.txt, without comments."""
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if re.match(r"torch(vision)?\b[^-]", line)]


def run_torch_step(tmp_path: Path, driver: str | None, nvidia_smi_status: int = 0) -> tuple[int, str, list[str]]:
    """Run the step on a node whose nvidia-smi prints `driver` (None: no nvidia-smi at all).

    Returns the exit status, the output and uv's arguments ([] if uv was not called).
    """
    tools = tmp_path / "bin"
    tools.mkdir()
    for command in SYSTEM_COMMANDS:
        (tools / command).symlink_to(shutil.which(command))
    (tools / "uv").write_text(UV)
    if driver is not None:
        (tools / "nvidia-smi").write_text(f"#!/bin/sh\nprintf '%s\\n' {shlex.quote(driver)}\nexit {nvidia_smi_status}\n")
    for tool in tools.iterdir():
        tool.chmod(0o755)
    workdir = tmp_path / "workdir"  # a copy of the repository's requirements.txt, as on a node
    workdir.mkdir()
    shutil.copy(REPO / "requirements.txt", workdir)
    (tmp_path / "torch-step.sh").write_text(torch_step())
    uv_args = tmp_path / "uv-args.txt"
    result = subprocess.run(
        [shutil.which("bash"), str(tmp_path / "torch-step.sh")],
        cwd=workdir,
        env={"PATH": str(tools), "UV_ARGS": str(uv_args)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    called = uv_args.read_text().splitlines() if uv_args.exists() else []
    return result.returncode, result.stdout + result.stderr, called


def test_requirements_pin_torch_and_torchvision_exactly():
    """The step installs these pins from PyTorch's index; requirements.txt then finds them satisfied."""
    assert [line.split("==")[0] for line in torch_requirements()] == ["torch", "torchvision"]
    assert all(re.fullmatch(r"torch(vision)?==[\w.]+", line) for line in torch_requirements())


@pytest.mark.parametrize(
    ("driver", "build"),
    [
        ("580.95.05", "cu130"),
        ("570.86.10", "cu128"),
        ("535.216.01", "cu126"),  # SkyPilot's older images; CUDA 12 minor-version compatibility
        ("525.60.13", "cu126"),  # the oldest driver that runs CUDA 12 builds
        ("570.86.10\n570.86.10", "cu128"),  # two GPUs
    ],
    ids=["driver-580", "driver-570", "driver-535", "driver-525", "two-gpus"],
)
def test_torch_step_installs_build_for_driver(tmp_path, driver, build):
    status, output, uv_args = run_torch_step(tmp_path, driver)
    assert status == 0, output
    assert uv_args == ["pip", "install", "--index-url", INDEX + build, *torch_requirements()]


@pytest.mark.parametrize(
    ("driver", "nvidia_smi_status", "found"),
    [
        ("470.1", 0, "470.1"),
        (None, 0, "none"),
        ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", 9, "none"),
        ("No devices were found", 6, "none"),
    ],
    ids=["driver-470", "no-nvidia-smi", "nvidia-smi-failing", "no-gpu"],
)
def test_torch_step_without_usable_driver_fails(tmp_path, driver, nvidia_smi_status, found):
    status, output, uv_args = run_torch_step(tmp_path, driver, nvidia_smi_status)
    assert status != 0
    [line] = output.splitlines()  # one line, saying what is needed and what was found
    assert line.startswith("error: ") and "driver >= 525" in line, line
    assert f"found: {found}" in line, line
    assert uv_args == []  # nothing installed
