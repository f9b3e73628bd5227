"""Decode, SAM3 and the outputs side by side (a decode thread, SAM3 here, the outputs in a forked
process): the same files as one after another, a failure in any stage fails that video alone,
and Ctrl-C, SIGTERM or SIGKILL leave no process behind and nothing that looks complete."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import multiprocessing
import os
import select
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

import sam3_pipeline.sam3
import sam3_pipeline.video_io
import sam3_pipeline.windows
from conftest import REPO, failure_lines, run_cli, segment, write_test_video

# Fields that say how and when a run went, not what it found.
RUN_FIELDS = {
    "processing_seconds", "assembly_seconds", "frames_per_second", "stage_seconds", "pipeline", "completed_at",
    "output_video", "windows",
}  # fmt: skip
FINISHED_LOOKING = ("_segmented.mp4", "_tracks.jsonl", "_mot.txt", "_preview.jpg", "_metadata.json")


def frames_of(video: Path) -> list[np.ndarray]:
    with av.open(str(video)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_overlapped_outputs_are_the_serial_outputs_byte_for_byte(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Every file byte for byte (MP4, preview, tracks, MOT, and the metadata but for who, when and
    how fast), from the very same frames handed to the encoder; and those frames encode to the
    same bytes whatever the heap held before, which is what lets the MP4s agree."""
    video = write_test_video(tmp_path / "match.mp4", seconds=2.0, fps=10, size=(320, 192))
    encoded = tmp_path / "encoded.txt"  # the child process appends to it too
    real_write = sam3_pipeline.video_io.H264Writer.write

    def write(self, rgb):
        with encoded.open("a") as log:
            log.write(f"{hashlib.sha256(rgb.tobytes()).hexdigest()}\n")
        real_write(self, rgb)

    monkeypatch.setattr(sam3_pipeline.video_io.H264Writer, "write", write)
    metadata, frames_in = {}, {}
    for mode in ("serial", "overlapped"):
        out = tmp_path / mode
        extra = ["--sample-fps", "0", "--chunk-frames", "8", *(["--serial"] if mode == "serial" else [])]
        code, stderr = run_cli(segment([video], out, tiny_model_dir, *extra), capsys)
        assert code == 0, stderr
        metadata[mode] = json.loads((out / "match" / "match_metadata.json").read_text())
        assert metadata[mode]["pipeline"] == mode
        frames_in[mode] = encoded.read_text().splitlines()
        encoded.unlink()

    assert len(frames_in["serial"]) == 20 and frames_in["serial"] == frames_in["overlapped"]
    serial, overlapped = metadata["serial"], metadata["overlapped"]
    assert serial["chunking"]["windows"] == 3, "IDs carried across windows in both"
    assert {k: v for k, v in serial.items() if k not in RUN_FIELDS} == {
        k: v for k, v in overlapped.items() if k not in RUN_FIELDS
    }
    for name in ("match_segmented.mp4", "match_preview.jpg", "match_tracks.jsonl", "match_mot.txt"):
        assert (tmp_path / "serial" / "match" / name).read_bytes() == (
            tmp_path / "overlapped" / "match" / name
        ).read_bytes(), name
    assert set(overlapped["stage_seconds"]) == {
        "decode", "preprocess", "sam3", "masks", "overlay", "encode", "tracks"
    }  # fmt: skip
    for mode in ("serial", "overlapped"):  # which window, computed how: the same but for who and when
        windows = metadata[mode]["windows"]
        how = ("computed_by", "seconds", "completed_at")
        assert [{k: v for k, v in w.items() if k not in how} for w in windows] == [
            {"window": 0, "first_frame": 0, "frames": 8, "positions": [0, 7]},
            {"window": 1, "first_frame": 8, "frames": 7, "positions": [8, 14]},
            {"window": 2, "first_frame": 15, "frames": 5, "positions": [15, 21]},
        ]
    drawn = frames_of(tmp_path / "serial" / "match" / "match_segmented.mp4")
    assert len(drawn) == 20
    assert len(set(encodings_with_heap_filled(drawn[:8], tmp_path, fills=(0x11, 0x77, 0xA5)))) == 1


def encodings_with_heap_filled(frames: list[np.ndarray], folder: Path, fills: tuple[int, ...]) -> list[bytes]:
    """The bytes `H264Writer` makes of the same frames, once per fill: glibc's M_PERTURB fills each
    allocation with that byte, so an encoder that reads memory it never wrote makes different files.
    libx264's macroblock-tree rate control did, on overlay frames like these."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_perturb = -6
    height, width = frames[0].shape[:2]
    files = []
    for fill in fills:
        libc.mallopt(m_perturb, fill)
        try:
            with sam3_pipeline.video_io.H264Writer(folder / f"{fill}.mp4", width, height, Fraction(10)) as writer:
                for frame in frames:
                    writer.write(frame)
        finally:
            libc.mallopt(m_perturb, 0)
        files.append((folder / f"{fill}.mp4").read_bytes())
    return files


def fail_in_video_a(function, error: Exception):
    """`function`, raising `error` on its 4th call for video a (160 pixels wide; b is 192).

    Counted in each process: the outputs stage runs in a process forked per video, with the
    count as it was at the fork."""
    calls = []

    def wrapper(*args, **kwargs):
        frame = args[0]
        if isinstance(frame, (av.VideoFrame, np.ndarray)):
            width = frame.width if isinstance(frame, av.VideoFrame) else frame.shape[1]
        else:  # SAM3's output, in this process for every video: a comes first
            width = 160
        calls.append(width)
        if calls.count(160) == 4 and width == 160:
            raise error
        return function(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize(
    ("module", "name", "error", "shown"),
    [
        (sam3_pipeline.video_io, "frame_rgb", OSError(5, "Input/output error"), "[Errno 5] Input/output error"),
        (sam3_pipeline.sam3, "session_output", RuntimeError("CUDA error: out of memory"), "CUDA error: out of memory"),
        (sam3_pipeline.windows, "draw_overlay", MemoryError("no room"), "MemoryError: no room"),
    ],
    ids=["decode-thread", "sam3-stage", "outputs-process"],
)
def test_a_failure_in_any_stage_fails_that_video_alone(
    tmp_path, tiny_model_dir, capsys, monkeypatch, module, name, error, shown
):
    """The error comes on the 4th frame of the first video (10 frames); the second is whole."""
    videos = tmp_path / "videos"
    videos.mkdir()
    write_test_video(videos / "a.mp4", seconds=1.0, fps=10, size=(160, 96))
    write_test_video(videos / "b.mp4", seconds=1.0, fps=10, size=(192, 112))
    monkeypatch.setattr(module, name, fail_in_video_a(getattr(module, name), error))
    out = tmp_path / "out"
    code, stderr = run_cli(segment([videos], out, tiny_model_dir, "--sample-fps", "0"), capsys)

    assert code == 1
    assert "Traceback" not in stderr
    [line] = failure_lines(stderr)
    assert "a.mp4" in line and shown in line, line
    assert json.loads((out / "a" / "a_error.json").read_text())["status"] == "failed"
    assert not [p.name for p in (out / "a").iterdir() if p.name.endswith(FINISHED_LOOKING)]
    assert json.loads((out / "b" / "b_metadata.json").read_text())["frames_processed"] == 10
    assert multiprocessing.active_children() == [], "no outputs process left running"


# ---------------------------------------------------------------------------------------------
# Stopping a run from outside
# ---------------------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    """The pids of the processes whose parent is `pid`."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its exit status waits to be collected


def start_long_run(tmp_path: Path, model: Path) -> tuple[subprocess.Popen, int]:
    """A run of a 600-frame video in its own session (as a shell runs a job), once its outputs
    process is at work: (the run, the outputs process's pid)."""
    video = write_test_video(tmp_path / "long.mp4", seconds=24.0, fps=25, size=(320, 192))
    command = [sys.executable, str(REPO / "process_segmentation.py")]
    command += segment([video], tmp_path / "out", model, "--sample-fps", "0")
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    # Each progress update wakes this loop; the progress bar moves once SAM3 hands frames over.
    seen = b""
    while chunk := os.read(process.stderr.fileno(), 65536):
        seen += chunk
        if b"frame/s" in seen[-2000:] and (children := children_of(process.pid)):
            return process, children[0]
    raise AssertionError(f"the run ended before it could be stopped: {seen[-2000:]!r}")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("how", "exit_code"),
    [("SIGINT to the process group (Ctrl-C)", 130), ("SIGTERM to the script (sky jobs cancel)", 143)],
    ids=["ctrl-c", "sigterm"],
)
def test_ctrl_c_and_sigterm_stop_every_stage(tmp_path, tiny_model_dir, how, exit_code):
    process, outputs_process = start_long_run(tmp_path, tiny_model_dir)
    try:
        if how.startswith("SIGINT"):
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == exit_code, stderr.decode()[-2000:]
    assert not alive(outputs_process), "the outputs process ended with the run"
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)  # nothing of the run is left in its process group
    names = [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert not [name for name in names if name.endswith(FINISHED_LOOKING)], names
    assert b"Traceback" not in stderr


@pytest.mark.slow
def test_sigkill_of_the_run_ends_its_outputs_process_too(tmp_path, tiny_model_dir):
    process, outputs_process = start_long_run(tmp_path, tiny_model_dir)
    ended = os.pidfd_open(outputs_process)  # readable once that process has ended
    try:
        process.kill()
        process.wait()
        process.stderr.close()
        # The kernel ends it at once; the bound only keeps a stuck one from hanging CI.
        readable, _, _ = select.select([ended], [], [], 60)
    finally:
        os.close(ended)
    assert readable, "the orphaned outputs process kept running"
    names = [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert not [name for name in names if name.endswith(FINISHED_LOOKING)], names


STUCK_OUTPUTS = """
import os, sys, threading
sys.path.insert(0, sys.argv[1])
from sam3_pipeline.stages import ChildProcess

def stuck(items):  # an outputs stage that never returns (a hung write, say) after its first item
    next(iter(items))
    print(os.getpid(), flush=True)
    threading.Event().wait()

with ChildProcess(stuck, (), 1) as child:
    child.run([bytes(1 << 20)])
"""


def test_an_outputs_process_stuck_anywhere_ends_when_the_run_is_killed():
    """Whatever the outputs process is doing (here: blocked outside its queue, where no poll of its
    own can see the parent go), SIGKILL of the run ends it: nothing is left on the worker."""
    process = subprocess.Popen([sys.executable, "-c", STUCK_OUTPUTS, str(REPO)], stdout=subprocess.PIPE)
    try:
        outputs_process = int(process.stdout.readline())
        ended = os.pidfd_open(outputs_process)
        process.kill()
        process.wait()
        try:
            readable, _, _ = select.select([ended], [], [], 60)
        finally:
            os.close(ended)
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
    assert readable, "the outputs process outlived the run"
