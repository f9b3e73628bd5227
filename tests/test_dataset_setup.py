"""The pool's setup, run by bash as written in sam3-pool.yaml, against stand-in commands.

Most tests run the dataset step alone. The real `kaggle` cannot be reached here, so a stand-in on
PATH writes a small zip and logs its calls. A "bucket" is a temporary folder (DATASET_DIR), and
TMPDIR plays one node's local disk (the lock and the download folder live there): two TMPDIRs are
two nodes. The last tests run the whole setup with stand-ins for uv, nvidia-smi (driver 580), the
weights download and the final device check too (tests/test_gpu_setup.py covers the torch step).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DATASET = "shreyamainkar/football-soccer-videos-dataset"
# What the stand-in archive holds: a name with a space and a nested folder included.
FILES = {"1.mp4": b"a" * 3000, "10.mp4": b"b" * 5000, "more clips/clip 2.mp4": b"c" * 2000}
BLOCKS = [("# --- inputs", "# --- end inputs ---"), ("# --- dataset", "# --- end dataset ---")]

KAGGLE = """\
import os, sys, zipfile
args = sys.argv[1:]
with open(os.environ["STAND_IN_LOG"], "a") as calls:
    calls.write(" ".join(args) + "\\n")
if os.environ.get("FAIL_AT") == "download":
    sys.exit("401 - Unauthorized")
assert args[:2] == ["datasets", "download"] and "-p" in args, args
dataset = next(a for a in args[2:] if "/" in a and a != args[args.index("-p") + 1])
with zipfile.ZipFile(os.path.join(args[args.index("-p") + 1], dataset.split("/")[1] + ".zip"), "w") as archive:
    for name, data in FILES.items():
        archive.writestr(name, data)
"""
# python: the real interpreter, except that the weights download (`-m sam3_pipeline.hub`)
# and the device check (`process_segmentation.py --check-device`) are only logged, and that it kills the whole setup (its process group), as a preemption would,
# with KILL_DURING=unzip after `-m zipfile -e` has extracted one member, and with
# KILL_DURING=copy after the copy into the bucket has written half of its first file.
PYTHON = """\
import os, signal, sys, zipfile
args = sys.argv[1:]
if args[:2] == ["-m", "sam3_pipeline.hub"]:
    with open(os.environ["STAND_IN_LOG"], "a") as calls:
        calls.write("weights " + " ".join(args[2:]) + "\\n")
    sys.exit(1 if os.environ.get("FAIL_AT") == "weights" else 0)
if args[:2] == ["process_segmentation.py", "--check-device"]:
    with open(os.environ["STAND_IN_LOG"], "a") as calls:
        calls.write("device " + " ".join(args) + "\\n")
    if os.environ.get("FAIL_AT") == "device":
        print("error: --device cuda: torch 2.14.1+cu130 (CUDA 13.0) cannot see a CUDA GPU although"
              " NVIDIA driver 535.216.01 is installed", file=sys.stderr)
        sys.exit(2)
    print("cuda: NVIDIA L40S, driver 580.95, torch 2.14.1+cu130 (CUDA 13.0), bfloat16")
    sys.exit(0)
if args[:3] == ["-m", "zipfile", "-e"] and os.environ.get("KILL_DURING") == "unzip":
    with zipfile.ZipFile(args[3]) as archive:
        archive.extract(archive.namelist()[0], args[4])
    os.killpg(0, signal.SIGKILL)
if args[:1] == ["-c"] and "copytree" in args[1] and os.environ.get("KILL_DURING") == "copy":
    source, destination = args[-2:]
    first = sorted(os.path.join(d, f) for d, _, fs in os.walk(source) for f in fs)[0]
    target = os.path.join(destination, os.path.relpath(first, source))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    data = open(first, "rb").read()
    open(target, "wb").write(data[: len(data) // 2])
    os.killpg(0, signal.SIGKILL)
os.execv(sys.executable, [sys.executable, *args])
"""

# uv: `venv` makes a venv whose activate puts the stand-ins first on PATH; `pip install` is logged
# and fails, as uv does, on a requirements (-r) or constraints (-c) file that is not there
# (FAIL_AT=torch fails the install from PyTorch's index, FAIL_AT=pip the one from requirements.txt).
UV = """\
import os, sys
args = sys.argv[1:]
with open(os.environ["STAND_IN_LOG"], "a") as calls:
    calls.write("uv " + " ".join(args) + "\\n")
for flag, name in zip(args, args[1:]):
    if flag in ("-r", "-c") and not os.path.isfile(name):
        sys.exit(f"error: File not found: `{name}`")
if args[0] == "venv":
    os.makedirs(os.path.join(args[-1], "bin"))
    with open(os.path.join(args[-1], "bin", "activate"), "w") as activate:
        activate.write('export PATH="%s:$PATH"\\n' % os.environ["VENV_TOOLS"])
    os.symlink(sys.executable, os.path.join(args[-1], "bin", "python"))
elif os.environ.get("FAIL_AT") == ("torch" if "--index-url" in args else "pip"):
    sys.exit("No solution found when resolving dependencies")
"""

NVIDIA_SMI = 'print("580.95.05")  # --query-gpu=driver_version --format=csv,noheader on an L40S\n'


def pool_envs() -> dict:
    return yaml.safe_load((REPO / "sam3-pool.yaml").read_text())["envs"]


def pool_setup() -> str:
    return yaml.safe_load((REPO / "sam3-pool.yaml").read_text())["setup"]


def dataset_step() -> str:
    """The input check and the dataset step of the pool's setup, with the setup's own shell options."""
    lines = pool_setup().splitlines()
    assert lines[0] == "set -euo pipefail", "the setup should start with its shell options"
    step = [lines[0]]
    for begin, end in BLOCKS:
        first = next(i for i, line in enumerate(lines) if line.startswith(begin))
        step += lines[first : lines.index(end) + 1]
    return "\n".join(step) + "\n"


def write_tool(path: Path, body: str) -> None:
    path.write_text(f"#!{sys.executable}\nFILES = {FILES!r}\n" + body)
    path.chmod(0o755)


class Bench:
    """A bucket, a log of stand-in calls and the stand-ins; `start`/`run` launch the dataset step
    (script="dataset-step.sh", stand-ins first on PATH) or the whole setup (script="setup.sh",
    stand-ins reached as SkyPilot's uv and through the venv that uv makes)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bucket = root / "bucket"
        self.dataset = self.bucket / "datasets" / "soccer-videos"
        self.marker = Path(f"{self.dataset}.complete")
        self.log = root / "stand-in-calls.txt"
        (root / "dataset-step.sh").write_text(dataset_step())
        (root / "setup.sh").write_text(pool_setup())
        self.tools = root / "bin"
        self.tools.mkdir()
        write_tool(self.tools / "kaggle", KAGGLE)
        write_tool(self.tools / "python", PYTHON)
        write_tool(self.tools / "nvidia-smi", NVIDIA_SMI)
        self.home = root / "home"  # SkyPilot installs uv in ~/.local/bin
        (self.home / ".local" / "bin").mkdir(parents=True)
        write_tool(self.home / ".local" / "bin" / "uv", UV)
        self.workdir = root / "workdir"
        self.workdir.mkdir()
        shutil.copy(REPO / "requirements.txt", self.workdir)  # the torch step reads its pins
        shutil.copy(REPO / "constraints.txt", self.workdir)

    def start(self, node: str = "node-a", script: str = "dataset-step.sh", **env: str) -> subprocess.Popen:
        tmpdir = self.root / node
        tmpdir.mkdir(exist_ok=True)
        bin_dir = self.tools
        path = os.environ["PATH"] if script == "setup.sh" else f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
        full_env = {
            **os.environ,
            "PATH": path,
            "HOME": str(self.home),
            "VENV_TOOLS": str(bin_dir),
            "DATASET": pool_envs()["DATASET"],  # as SkyPilot exports the YAML's envs
            "VIDEO_DIR": str(self.dataset),
            "KAGGLE_USERNAME": "someone",  # as --secret KAGGLE_USERNAME --secret KAGGLE_KEY give them
            "KAGGLE_KEY": "0123",
            "TMPDIR": str(tmpdir),
            "STAND_IN_LOG": str(self.log),
            **env,
        }
        # A session of its own, so that a stand-in can kill the whole step and nothing else.
        return subprocess.Popen(
            ["bash", str(self.root / script)],
            env=full_env,
            cwd=self.workdir,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def run(self, node: str = "node-a", script: str = "dataset-step.sh", **env: str) -> tuple[int, str]:
        process = self.start(node, script, **env)
        output, _ = process.communicate(timeout=60)
        return process.returncode, output

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def steps(self) -> list[str]:
        """What the stand-ins were asked to do, in order: venv, torch, pip, download, weights, device."""
        labels = {
            "uv venv ": "venv",
            "uv pip install --index-url ": "torch",
            "uv pip install ": "pip",
            "datasets download ": "download",
            "weights ": "weights",
            "device ": "device",
        }
        return [
            next(label for prefix, label in labels.items() if call.startswith(prefix))
            for call in self.calls()
        ]

    def downloads(self) -> list[str]:
        return [call for call in self.calls() if call.startswith("datasets download")]

    def dataset_files(self) -> dict[str, bytes]:
        return {
            p.relative_to(self.dataset).as_posix(): p.read_bytes()
            for p in self.dataset.rglob("*")
            if p.is_file()
        }

    def assert_complete(self) -> None:
        assert self.dataset_files() == FILES
        listing = "".join(f"{name}\t{len(data)}\n" for name, data in sorted(FILES.items()))
        assert self.marker.read_text() == listing
        for node in self.root.glob("node-*"):  # no download folder left behind on any node
            assert sorted(p.name for p in node.iterdir()) == ["sam3-dataset.lock"]


@pytest.fixture
def bench(tmp_path: Path) -> Bench:
    return Bench(tmp_path)


def test_dataset_setup_first_run_downloads(bench):
    status, output = bench.run()
    assert status == 0, output
    [call] = bench.downloads()
    assert call.startswith(f"datasets download {DATASET} -p {bench.root / 'node-a' / 'sam3-dataset-tmp.'}")
    bench.assert_complete()


def test_dataset_setup_complete_marker_skips_download(bench):
    assert bench.run()[0] == 0
    status, output = bench.run()
    assert status == 0, output
    assert "already complete" in output
    assert len(bench.downloads()) == 1
    bench.assert_complete()


def test_dataset_setup_concurrent_runs_download_once(bench):
    processes = [bench.start() for _ in range(3)]
    results = [(process.wait(timeout=60), process.stdout.read()) for process in processes]
    assert [status for status, _ in results] == [0, 0, 0], results
    assert len(bench.downloads()) == 1
    bench.assert_complete()


@pytest.mark.parametrize("stage", ["unzip", "copy"], ids=["killed-mid-unzip", "killed-mid-copy"])
def test_dataset_setup_killed_leaves_no_marker(bench, stage):
    status, output = bench.run(KILL_DURING=stage)
    assert status == -signal.SIGKILL, output
    assert not bench.marker.exists()
    if stage == "copy":  # the bucket holds a truncated file, which must not count as done
        assert bench.dataset_files() and bench.dataset_files() != FILES

    status, output = bench.run()
    assert status == 0, output
    assert len(bench.downloads()) == 2
    bench.assert_complete()


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_dataset_setup_marker_not_matching_files_downloads_again(bench, damage):
    """A marker whose files are not all there (e.g. another node's upload not visible yet) is not done."""
    assert bench.run()[0] == 0
    victim = bench.dataset / "10.mp4"
    if damage == "missing":
        victim.unlink()
    else:
        victim.write_bytes(b"b" * 10)
    status, output = bench.run()
    assert status == 0, output
    assert len(bench.downloads()) == 2
    bench.assert_complete()


def test_dataset_setup_two_nodes_at_once_stay_consistent(bench):
    """Nodes do not share the lock: each may download, and the result is the same complete dataset."""
    processes = [bench.start("node-a"), bench.start("node-b")]
    results = [(process.wait(timeout=60), process.stdout.read()) for process in processes]
    assert [status for status, _ in results] == [0, 0], results
    assert 1 <= len(bench.downloads()) <= 2
    bench.assert_complete()


def test_dataset_setup_download_failure_fails_setup(bench):
    status, output = bench.run(FAIL_AT="download")
    assert status != 0
    assert "401" in output
    assert not bench.marker.exists()
    assert not bench.dataset.exists()


def test_setup_rerun_reuses_venv_and_dataset(bench):
    status, output = bench.run(script="setup.sh")
    assert status == 0, output
    assert bench.steps() == ["venv", "torch", "pip", "download", "weights", "device"]
    assert "--index-url https://download.pytorch.org/whl/cu130 " in bench.calls()[1]
    assert bench.calls()[2] == "uv pip install -r requirements.txt kaggle -c constraints.txt"
    assert bench.calls()[-1] == "device process_segmentation.py --check-device --device cuda"
    assert "cuda: NVIDIA L40S" in output
    bench.assert_complete()

    bench.log.unlink()
    status, output = bench.run(script="setup.sh")
    assert status == 0, output
    assert bench.steps() == ["torch", "pip", "weights", "device"]  # the venv and the dataset are reused
    assert output.rstrip().endswith("Setup complete")


@pytest.mark.parametrize("stage", ["torch", "pip", "download", "weights", "device"])
def test_setup_step_failure_fails_setup(bench, stage):
    status, output = bench.run(script="setup.sh", FAIL_AT=stage)
    assert status != 0, output
    assert "Setup complete" not in output
    assert bench.steps()[-1] == stage  # nothing runs after the step that failed
    assert bench.marker.exists() == (stage in ("weights", "device"))


def test_setup_gpu_not_seen_by_torch_fails_setup(bench):
    """A worker whose PyTorch cannot see the GPU fails at setup, saying why, and not in every job."""
    status, output = bench.run(script="setup.sh", FAIL_AT="device")
    assert status == 2, output
    assert output.rstrip().splitlines()[-1].startswith("error: --device cuda: ")
    assert "driver 535.216.01" in output


def test_the_default_dataset_is_the_kaggle_soccer_dataset():
    assert pool_envs()["DATASET"] == f"kaggle:{DATASET}"


def test_another_public_kaggle_dataset_is_named_with_an_env(bench):
    status, output = bench.run(DATASET="kaggle:someone/other-clips")
    assert status == 0, output
    [call] = bench.downloads()
    assert call.startswith("datasets download someone/other-clips -p ")
    bench.assert_complete()


def test_videos_in_the_bucket_are_read_where_they_are_without_kaggle(bench, tmp_path):
    """--env DATASET=bucket --env VIDEO_DIR=/outputs/matches: nothing is downloaded or copied."""
    videos = tmp_path / "bucket" / "matches"
    (videos / "2024").mkdir(parents=True)
    (videos / "2024" / "final.mp4").write_bytes(b"v" * 100)
    status, output = bench.run(DATASET="bucket", VIDEO_DIR=str(videos), KAGGLE_USERNAME="", KAGGLE_KEY="")
    assert status == 0, output
    assert f"Videos read where they are, in {videos}" in output
    assert bench.calls() == [], "kaggle is never called"
    assert [p.name for p in videos.rglob("*")] == ["2024", "final.mp4"]
    assert not Path(f"{videos}.complete").exists()


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"DATASET": "bucket"}, "DATASET=bucket but VIDEO_DIR="),  # the default VIDEO_DIR, never filled
        ({"KAGGLE_USERNAME": "", "KAGGLE_KEY": ""}, "needs Kaggle credentials: pass --secret KAGGLE_USERNAME"),
        ({"KAGGLE_KEY": ""}, "needs Kaggle credentials"),
        ({"DATASET": "s3://my-bucket/matches"}, "unknown DATASET=s3://my-bucket/matches: use kaggle:"),
        ({"DATASET": "kaggle:no-owner"}, "unknown DATASET=kaggle:no-owner"),
    ],
    ids=["empty-bucket-folder", "no-kaggle-secrets", "no-kaggle-key", "unknown-source", "kaggle-without-owner"],
)
def test_bad_dataset_inputs_fail_setup_in_one_line_before_anything_else(bench, env, says):
    status, output = bench.run(script="setup.sh", **env)
    assert status == 1, output
    assert output.strip().splitlines() == [next(line for line in output.splitlines() if line.startswith("error: "))]
    assert says in output, output
    assert bench.calls() == [], "nothing installed, nothing downloaded"


def test_kaggle_token_alone_is_credentials(bench):
    status, output = bench.run(KAGGLE_USERNAME="", KAGGLE_KEY="", KAGGLE_API_TOKEN="KGAT_0123")
    assert status == 0, output
    assert len(bench.downloads()) == 1


@pytest.mark.parametrize("spelling", ["{}/", "{}//", "{}/.", "{}/./"], ids=["slash", "two-slashes", "dot", "dot-slash"])
def test_another_spelling_of_video_dir_finds_the_dataset_complete(bench, spelling):
    assert bench.run()[0] == 0
    status, output = bench.run(VIDEO_DIR=spelling.format(bench.dataset))
    assert status == 0, output
    assert f"Dataset already complete in {bench.dataset}\n" in output
    assert len(bench.downloads()) == 1, "downloaded once"
    bench.assert_complete()
    assert not list(bench.dataset.glob("*.complete")), "no marker inside the dataset's folder"
