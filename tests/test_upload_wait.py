"""The run blocks as SkyPilot runs them: with its wait for the MOUNT_CACHED uploads appended.

SkyPilot 0.14.1 appends to a task's `run` a loop that waits until rclone's log says
"in use 0, to upload 0, uploading 0" and then exits with the run block's status
(tests/sky_task_script.py composes the script with SkyPilot's own functions). A run block that
exits, or stops on `set -e`, ends the job before its files are uploaded; one that leaves
`pipefail` on makes the wait itself fail.

Here the composed script runs with `bash -i`, as on a node, with a temporary HOME whose
~/sky_workdir is this repository. Stand-ins on PATH: `findmnt` shows the bucket's rclone mount,
and `sleep` returns at once and makes the rclone log say the uploads are done on its third call,
i.e. after the wait has polled once and found uploads still running.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_in_skypilot_venv
from test_job_shares import PROMPTS, completed, make_clips

REPO = Path(__file__).resolve().parent.parent
YAMLS = {"job": "sam3-job.yaml", "single": "sam3-test-single.yaml"}
FOLDERS = {"good": 0, "broken": 1}  # the videos of each folder -> the job's expected exit status
UPLOADING = "in use 0, to upload 2, uploading 1, total size 3.1Mi (was 3.1Mi)"
DONE = "in use 0, to upload 0, uploading 0, total size 3.1Mi (was 3.1Mi)"
CASES = [(yaml, folder) for yaml in YAMLS for folder in FOLDERS]

FINDMNT = """#!/bin/sh
echo "/outputs my-bucket: fuse.rclone rw,nosuid,nodev,relatime,user_id=1000,group_id=1000"
"""
# The wait sleeps once, then once per poll of the log. A wait that never ends is stopped.
SLEEP = f"""#!{sys.executable}
import os, signal
count = os.path.join(os.environ["HOME"], "sleep-calls")
calls = (int(open(count).read()) if os.path.exists(count) else 0) + 1
open(count, "w").write(str(calls))
if calls == 3:
    with open(os.environ["RCLONE_TEST_LOG"], "a") as log:
        log.write("2025/11/26 03:10:00 INFO  : vfs cache: cleaned: objects 9 (was 9) {DONE}\\n")
if calls > 10:
    print("stand-in sleep: the upload wait is still polling after 10 sleeps", flush=True)
    os.kill(os.getppid(), signal.SIGKILL)
"""


def rclone_log() -> str:
    """What rclone has logged when the job's last write returns: a job's worth of polls (long
    enough that `tac log | grep -m 1` meets SIGPIPE, which matters under `pipefail`), then uploads."""
    lines = [
        f"2025/11/26 {hour:02d}:{minute:02d}:00 INFO  : vfs cache: cleaned: objects 3 (was 3) {DONE}"
        for hour in range(3)
        for minute in range(60)
        for _ in range(10)
    ]
    lines.append(
        "2025/11/26 03:09:58 INFO  : segmentation_results/x/x_segmented.mp4: vfs cache: queuing for upload in 5s"
    )
    lines.append(f"2025/11/26 03:09:59 INFO  : vfs cache: cleaned: objects 9 (was 9) {UPLOADING}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("upload-wait")


@pytest.fixture(scope="module")
def composed(root: Path, tiny_model_dir: Path) -> dict[tuple[str, str], str]:
    """(yaml, folder) -> the script SkyPilot runs for that YAML, launched with --env for that folder."""
    cases = [
        {
            "yaml": str(REPO / YAMLS[yaml]),
            "env": {
                "OUTPUT_BUCKET_NAME": "my-test-bucket",
                "VIDEO_DIR": str(root / f"{yaml}-{folder}" / "videos"),
                "OUTPUT_DIR": str(root / f"{yaml}-{folder}" / "out"),
                "MODEL": str(tiny_model_dir),
                "DEVICE": "cpu",
                "PROMPTS": ";".join(PROMPTS),
            },
            "secret": {"HF_TOKEN": "hf_test_token"},
        }
        for yaml, folder in CASES
    ]
    for case in cases:  # the job YAML declares no bucket
        if case["yaml"].endswith(YAMLS["job"]):
            del case["env"]["OUTPUT_BUCKET_NAME"]
    (root / "sky-home").mkdir()
    scripts = run_in_skypilot_venv("sky_task_script.py", cases, root / "sky-home")
    for case, script in zip(CASES, scripts, strict=True):
        assert "error" not in script, f"SkyPilot rejected {case}: {script['error']}"
    return {case: script["script"] for case, script in zip(CASES, scripts, strict=True)}


@pytest.mark.slow
@pytest.mark.parametrize(("yaml", "folder"), CASES, ids=[f"{yaml}-{folder}" for yaml, folder in CASES])
def test_run_waits_for_uploads_and_keeps_exit_status(root, composed, venv_dir, make_video, yaml, folder):
    case = root / f"{yaml}-{folder}"
    case.mkdir()
    videos = make_clips(case / "videos", {"good": 1}, make_video)
    if folder == "broken":
        (videos / "x.mp4").write_text("not a video\n")
    home = case / "home"
    home.mkdir()
    (home / "sky_workdir").symlink_to(REPO)  # where SkyPilot syncs the workdir
    log = home / ".sky" / "rclone_log" / f"{hashlib.md5(b'/outputs').hexdigest()}.log"  # named as SkyPilot does
    log.parent.mkdir(parents=True)
    log.write_text(rclone_log())
    tools = case / "bin"
    tools.mkdir()
    for name, body in {"findmnt": FINDMNT, "sleep": SLEEP}.items():
        (tools / name).write_text(body)
        (tools / name).chmod(0o755)
    (case / "task.sh").write_text(composed[yaml, folder])
    env = {key: value for key, value in os.environ.items() if not key.startswith("SKYPILOT_")}
    env.update(
        HOME=str(home),
        PATH=f"{tools}{os.pathsep}{os.environ['PATH']}",
        RCLONE_TEST_LOG=str(log),
        VENV_DIR=str(venv_dir),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    result = subprocess.run(
        ["/bin/bash", "-i", str(case / "task.sh")],  # as SkyPilot runs it
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    lines = result.stdout.splitlines()
    wait = [line for line in lines if line.startswith(("skypilot: ", "stand-in "))]
    print(f"\n{yaml} {folder}: exit status {result.returncode}; " + " | ".join(wait))

    assert result.returncode == FOLDERS[folder], result.stdout[-3000:]
    assert len(wait) == 2, result.stdout[-3000:]
    assert wait[0].startswith("skypilot: cached mount is still uploading") and UPLOADING in wait[0]
    assert wait[1].startswith("skypilot: cached mount upload complete")
    assert lines[-1] == wait[1]  # the job's own output all came before the wait
    assert (home / "sleep-calls").read_text() == "3"  # it polled until the log said done
    assert sorted(completed(case / "out")) == ["good"]
    assert (case / "out" / "summary.json").is_file()
    assert (case / "out" / "x" / "x_error.json").is_file() == (folder == "broken")
