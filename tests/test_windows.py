"""A window is the unit of work: windows found by seeking, kept as they are done, reused after a
kill, split over jobs, and assembled into the same results however they were computed."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
import pytest

from conftest import REPO, run_cli, segment, write_test_video
from ffmpeg_tools import ffmpeg, require_ffmpeg
from sam3_pipeline.outputs import output_problems
from sam3_pipeline.sam3 import shared_position, window_of
from sam3_pipeline.video_io import DecodeReport, sample_frames
from sam3_pipeline.windows import window_count, window_positions

require_ffmpeg()

# 12 s at 10 fps, sampled at 5 fps in windows of 11: positions 0-59, windows 0-10, 11-20, ... 51-59.
SIX_WINDOWS = ["--sample-fps", "5", "--chunk-frames", "11"]


def decoded(video: Path) -> tuple[list[float], list[np.ndarray]]:
    with av.open(str(video)) as container:
        frames = list(container.decode(video=0))
        return [float(frame.time) for frame in frames], [frame.to_ndarray(format="rgb24") for frame in frames]


def same_frames(a: Path, b: Path) -> bool:
    """The same frames at the same times; pixels within H.264 encoder noise."""
    times_a, frames_a = decoded(a)
    times_b, frames_b = decoded(b)
    return times_a == times_b and all(
        np.abs(x.astype(int) - y.astype(int)).mean() < 1.0 for x, y in zip(frames_a, frames_b, strict=True)
    )


def window_records(folder: Path) -> dict[int, dict]:
    return {int(path.stem[1:]): json.loads(path.read_text()) for path in sorted((folder / "windows").glob("w*.json"))}


@pytest.fixture(scope="module")
def six_window_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_video(tmp_path_factory.mktemp("six") / "six.mp4", seconds=12.0, fps=10, size=(160, 96))


@pytest.fixture(scope="module")
def uninterrupted(six_window_video: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The six-window video computed in one run: the folder of its results."""
    out = tmp_path_factory.mktemp("uninterrupted")
    command = [sys.executable, str(REPO / "process_segmentation.py")]
    command += segment([six_window_video], out, tiny_model_dir, *SIX_WINDOWS)
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "window 5 of 6" in result.stderr
    return out / "six"


# ---------------------------------------------------------------------------------------------
# Which frames a window holds follows from their times alone
# ---------------------------------------------------------------------------------------------


def test_windows_cover_every_position_once_and_share_one_frame():
    chunk = 11
    assert window_count(60, chunk) == 6 and window_count(11, chunk) == 1 and window_count(None, chunk) == 1
    assert window_count(12, chunk) == 2
    owned = [window_of(position, chunk) for position in range(60)]
    assert owned == sorted(owned) and set(owned) == set(range(6))
    for window in range(6):
        first, last = window_positions(window, chunk)
        assert [p for p in range(60) if window_of(p, chunk) == window] == list(range(first, min(last, 59) + 1))
        if window:
            assert shared_position(window, chunk) == first - 1, "the frame it shares is the one before its first"


def mkv_with_ms_timestamps(folder: Path) -> Path:
    video = folder / "ms.mkv"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x96:rate=30000/1001:duration=8", "-c:v", "libx264", "-g", "30", video)
    return video


def vfr_mp4(folder: Path) -> Path:
    """10 fps, then 30 fps, with a half-second gap between."""
    times = [i / 10 for i in range(40)] + [4.5 + i / 30 for i in range(90)]
    return write_test_video(folder / "vfr.mp4", frame_times=times)


@pytest.mark.parametrize("make", [mkv_with_ms_timestamps, vfr_mp4], ids=["mkv-ms-29.97", "vfr-mp4"])
@pytest.mark.parametrize("rate", [0, 1, 2.5, 30], ids=["every-frame", "1fps", "2.5fps", "30fps"])
def test_a_window_found_by_seeking_has_the_frames_of_a_pass_from_the_start(tmp_path, make, rate):
    video = make(tmp_path)
    with av.open(str(video)) as container:
        everything = [(s.position, s.source_index, s.timestamp) for s in sample_frames(container, rate, 0)]
    last = everything[-1][0]
    for after in sorted({1, 2, last // 3, last // 2, last - 1, last, last + 5}):
        report = DecodeReport()
        with av.open(str(video)) as container:
            found = [
                (s.position, s.source_index, s.timestamp) for s in sample_frames(container, rate, 0, report, after)
            ]
        before = [sample for sample in everything if sample[0] <= after]
        assert found == before[-1:] + [sample for sample in everything if sample[0] > after], (after, report)
        if after >= last // 2:
            assert report.seeked, "decoding started part way through"


@pytest.mark.slow
def test_computing_the_last_window_decodes_about_one_window(tmp_path, tiny_model_dir, capsys):
    """A 60 s video (a keyframe every 2 s) at 1 sample per second in windows of 11 samples: the
    job that holds only its last window decodes that window and the keyframe interval before
    it, not the 1,500 frames before."""
    video = tmp_path / "long.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=160x96:rate=25:duration=60", "-c:v", "libx264", "-g", "50", video)
    out = tmp_path / "out"
    # LPT over six windows of 11, 10, 10, 10, 10 and 9 samples: the last and lightest goes to shard 5.
    code, stderr = run_cli(
        segment([video], out, tiny_model_dir, "--chunk-frames", "11", "--shard-index", "5", "--num-shards", "6"), capsys
    )
    assert code == 0, stderr
    assert "long (windows 5 of 6)" in stderr
    [record] = window_records(out / "long").values()
    assert record["window"] == 5 and record["final"] and record["seeked"]
    assert record["timestamps"] == [51.0, 52.0, 53.0, 54.0, 55.0, 56.0, 57.0, 58.0, 59.0]
    span = (60 - 50) * 25  # from its shared frame (50 s) to the end
    assert record["frames_decoded"] <= span + 2 * 50, record["frames_decoded"]
    assert "wait " in stderr and "windows 0, 1, 2, 3, 4 of 6 still to come" in stderr


def test_streams_that_can_restart_are_read_from_the_start_in_one_unit(tmp_path, tiny_model_dir, capsys):
    """MPEG-TS: recordings joined with `cat` restart their timestamps, so windows are not sought
    in it; one unit computes them all, keeping each as it goes."""
    video = tmp_path / "joined.ts"
    with video.open("wb") as whole:
        for index in range(2):
            part = tmp_path / f"part{index}.ts"
            ffmpeg(
                "-f", "lavfi", "-i", "testsrc2=size=160x96:rate=10:duration=2", "-c:v", "libx264", "-f", "mpegts", part
            )
            whole.write(part.read_bytes())
    out = tmp_path / "out"
    code, stderr = run_cli(segment([video], out, tiny_model_dir, "--sample-fps", "0", "--chunk-frames", "8"), capsys)
    assert code == 0, stderr
    metadata = json.loads((out / "joined" / "joined_metadata.json").read_text())
    assert metadata["frames_processed"] == 40 and metadata["timestamp_discontinuities"] == 1
    records = window_records(out / "joined")
    assert sorted(records) == list(range(len(metadata["windows"]))) and len(records) >= 3
    assert not any(record["seeked"] for record in records.values())
    assert {record["computed_by"]["pid"] for record in records.values()} == {
        metadata["windows"][0]["computed_by"]["pid"]
    }


# ---------------------------------------------------------------------------------------------
# Windows persist: a kill costs the window in progress, not the video
# ---------------------------------------------------------------------------------------------


def run_until_killed(command: list[str], target: int, rng: random.Random) -> None:
    """Run the script and SIGKILL it at a random moment inside window `target`."""
    updates_into_it = rng.randrange(0, 2)  # as it starts, or once its bar has moved
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    seen = b""
    try:
        while chunk := os.read(process.stderr.fileno(), 65536):
            seen += chunk
            started = seen.find(f"window {target} of 6".encode())
            if started >= 0 and seen.count(b"frame/s", started) >= updates_into_it:
                break
        else:
            raise AssertionError(f"the run ended before window {target}: {seen[-2000:]!r}")
    finally:
        process.kill()
        process.wait()
        process.stderr.close()


@pytest.mark.slow
def test_kill_9_at_random_moments_then_a_rerun_computes_only_the_missing_windows(
    tmp_path, six_window_video, tiny_model_dir, uninterrupted, capsys
):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "process_segmentation.py")]
    command += segment([six_window_video], out, tiny_model_dir, *SIX_WINDOWS)
    killed_in = []
    for _ in range(2):
        done = set(window_records(out / "six")) if out.exists() else set()
        killed_in.append(rng.choice(sorted(set(range(1, 6)) - done)))
        run_until_killed(command, killed_in[-1], rng)
        records = window_records(out / "six")
        assert set(range(killed_in[-1])) <= set(records), f"seed {seed}: every window before the kill is kept"
        assert not (out / "six" / "six_metadata.json").exists(), f"seed {seed}"
        assert not [
            p.name for p in (out / "six").rglob("*") if p.name.endswith((".json", ".mp4")) and "partial" in p.name
        ]
    kept = window_records(out / "six")

    code, stderr = run_cli(segment([six_window_video], out, tiny_model_dir, *SIX_WINDOWS), capsys)
    assert code == 0, stderr
    for window in range(6):
        said = f"six.mp4 window {window}: computed before" in stderr
        assert said == (window in kept), f"seed {seed}, killed in {killed_in}: window {window}\n{stderr}"
    metadata = json.loads((out / "six" / "six_metadata.json").read_text())
    rerun = {window["computed_by"]["pid"] for window in metadata["windows"] if window["window"] not in kept}
    assert len(rerun) == 1, "the missing windows, all by the rerun"
    assert all(metadata["windows"][w]["computed_by"]["pid"] == kept[w]["computed_by"]["pid"] for w in kept)

    reference = json.loads((uninterrupted / "six_metadata.json").read_text())
    for name in ("six_tracks.jsonl", "six_mot.txt"):
        assert (out / "six" / name).read_bytes() == (uninterrupted / name).read_bytes(), f"seed {seed}: {name}"
    assert same_frames(out / "six" / "six_segmented.mp4", uninterrupted / "six_segmented.mp4")
    for field in ("objects", "sampled_timestamps", "sampled_frame_indices", "chunking", "frames_processed"):
        assert metadata[field] == reference[field], field


# ---------------------------------------------------------------------------------------------
# Shares split windows: the pool's way, over one output folder
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_three_jobs_of_the_run_block_split_a_long_video_and_match_one_job(tmp_path, make_video, run_block):
    """One 3-window video (12 s at 1 sample per second in windows of 5) and three short ones,
    three ranks of the job's run block on one output folder, against one rank alone."""
    videos = tmp_path / "videos"
    videos.mkdir()
    make_video(videos / "long.mp4", seconds=12, fps=5, size=(160, 96))
    for name, seconds in {"a": 3, "b": 2, "c": 2}.items():
        make_video(videos / f"{name}.mp4", seconds=seconds, fps=5, size=(160, 96))
    split, alone = tmp_path / "split", tmp_path / "alone"

    with ThreadPoolExecutor(max_workers=2) as pool:  # two cores in CI
        results = list(
            pool.map(
                lambda rank: run_block("sam3-job.yaml", split, rank, 3, VIDEO_DIR=str(videos), CHUNK_FRAMES="5"),
                range(3),
            )
        )
    for rank, (status, output) in enumerate(results):
        assert status == 0, f"rank {rank} failed:\n{output[-3000:]}"
    status, output = run_block("sam3-job.yaml", alone, VIDEO_DIR=str(videos), CHUNK_FRAMES="5")
    assert status == 0, output[-3000:]

    metadata = json.loads((split / "long" / "long_metadata.json").read_text())
    assert len(metadata["windows"]) == 3
    by_rank: dict[int, list[str]] = {}
    for key in ("long", "a", "b", "c"):
        record = json.loads((split / key / f"{key}_metadata.json").read_text())
        assert record["status"] == "complete", key
        for window in record["windows"]:
            by_rank.setdefault(window["computed_by"]["shard"], []).append(f"{key}/{window['window']}")
    assert sorted(by_rank) == [0, 1, 2], f"every rank computes a share: {by_rank}"
    assert sorted(sum(by_rank.values(), [])) == ["a/0", "b/0", "c/0", "long/0", "long/1", "long/2"]
    for name in ("long_tracks.jsonl", "long_mot.txt"):
        assert (split / "long" / name).read_bytes() == (alone / "long" / name).read_bytes(), name
    assert same_frames(split / "long" / "long_segmented.mp4", alone / "long" / "long_segmented.mp4")
    assert json.loads((split / "summary.json").read_text())["counts"]["done"] == 4


# ---------------------------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------------------------


def test_two_processes_assembling_one_video_leave_one_whole_result(tmp_path, uninterrupted):
    """Its results gone, its windows kept: two --summarize at once assemble it again."""
    out = tmp_path / "out"
    folder = out / "six"
    folder.mkdir(parents=True)
    for path in (uninterrupted / "windows").iterdir():
        (folder / "windows").mkdir(exist_ok=True)
        (folder / "windows" / path.name).write_bytes(path.read_bytes())
    command = [sys.executable, str(REPO / "process_segmentation.py"), "--summarize", str(out)]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr.decode()[-2000:]
    metadata = json.loads((folder / "six_metadata.json").read_text())
    assert output_problems(folder, metadata) == []
    for name in ("six_tracks.jsonl", "six_mot.txt", "six_segmented.mp4", "six_preview.jpg"):
        assert (folder / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    assert not [p.name for p in out.rglob("*") if p.name.endswith(".partial")]
    assert json.loads((out / "summary.json").read_text())["counts"]["done"] == 1
