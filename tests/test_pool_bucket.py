"""Correct on a pool's bucket: ranks of the job's run block side by side, each worker with its own
view of the output folder that shows the others' files late (`lagging_bucket`), jobs that end
together, more jobs than workers, a job that fails and is retried long after the others, reads
that fail on one worker, stale views, and window records that cannot be used.

The lag is longer than the closing `--summarize` takes to start (that start-up had hidden the
problem: with a 5 s lag a split video happened to be assembled), and BUCKET_LAG, the job's wait
at its end, is longer than the lag, as 30 s is longer than MOUNT_CACHED's 10-20 s on a pool.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import sam3_pipeline.assembly
from sam3_pipeline import computing
from conftest import REPO, run_cli, segment, write_test_video
from lagging_bucket import LaggingBucket
from sam3_pipeline.outputs import output_problems
from sam3_pipeline.progress import read_progress

LAG = 10.0  # seconds before one worker's file shows in the others' views
BUCKET_LAG = "15"  # the job's wait at its end: longer than the lag
FLAKY_READS = str(REPO / "tests" / "flaky_reads")  # PYTHONPATH for the read-error stand-in
# 12 s at 1 sample per second in windows of 5 samples: windows of 5, 4 and 3 samples.
LONG = {"long": 12}
CLIPS = {"b": 2, "c": 1}


def make_videos(folder: Path, seconds_by_name: dict[str, int], make_video) -> Path:
    folder.mkdir()
    for name, seconds in seconds_by_name.items():
        make_video(folder / f"{name}.mp4", seconds=seconds, fps=5, size=(160, 96))
    return folder


def computed_windows(log: str) -> list[str]:
    """`<video>/<window>` for each window a job's log says it computed (`N/M - path [window k of n]`)."""
    found = []
    for match in re.finditer(r"^\d+/\d+ - (\S+?)\.mp4(?: windows? (\d+)(?:-(\d+))? of \d+)?$", log, re.MULTILINE):
        name, first, last = Path(match[1]).name, int(match[2] or 0), match[3]
        found += [f"{name}/{window}" for window in range(first, int(last or first) + 1)]
    return found


def waits(log: str) -> list[float]:
    return [float(seconds) for seconds in re.findall(r"^waited ([\d.]+) s", log, re.MULTILINE)]


def assert_bucket_whole_and_reported(bucket: Path, names: list[str]) -> None:
    """Every video complete in the bucket, and summary.json, summary.csv and index.html say so."""
    for name in names:
        metadata = json.loads((bucket / name / f"{name}_metadata.json").read_text())
        assert metadata["status"] == "complete", name
        assert output_problems(bucket / name, metadata) == [], name
    summary = json.loads((bucket / "summary.json").read_text())
    assert summary["counts"] == {"done": len(names), "partial": 0, "failed": 0, "missing": 0}, summary["counts"]
    with (bucket / "summary.csv").open() as rows:
        assert {row["video"]: row["status"] for row in csv.DictReader(rows)} == dict.fromkeys(names, "done")
    cards = re.findall(r'<li class="card" data-status="(\w+)"', (bucket / "index.html").read_text())
    assert cards == ["done"] * len(names), cards


@pytest.mark.slow
def test_jobs_that_end_together_leave_a_split_video_whole_and_every_report_true(tmp_path, make_video, run_block):
    """Three ranks at once, one window of the long video each, on three workers that see each
    other's files 10 s late. Before: every rank logged `1 waiting for windows of other shares`,
    the bucket held the three windows and no MP4, and its summary said `missing`."""
    videos = make_videos(tmp_path / "videos", {**LONG, **CLIPS}, make_video)
    with LaggingBucket(tmp_path / "pool", workers=3, lag=LAG) as bucket:

        def job(rank: int) -> tuple[int, str]:
            return run_block(
                "sam3-job.yaml", bucket.views[rank], rank, 3,
                VIDEO_DIR=str(videos), CHUNK_FRAMES="5", BUCKET_LAG=BUCKET_LAG,
            )  # fmt: skip

        with ThreadPoolExecutor(max_workers=3) as pool:
            results = list(pool.map(job, range(3)))
        bucket.flush()  # SkyPilot's upload wait: everything written is in the bucket
    logs = "\n".join(output for _, output in results)
    for rank, (status, output) in enumerate(results):
        assert status == 0, f"rank {rank}:\n{output[-3000:]}"
    assert sorted(computed_windows(logs)) == ["b/0", "c/0", "long/0", "long/1", "long/2"], logs[-4000:]
    for rank, (_, output) in enumerate(results):  # each log opens with its share and closes with what it did
        assert re.search(rf"^shard {rank}/3: \d videos?, \d windows?, ~5 sampled frames: ", output, re.MULTILINE), output
        assert re.search(r"^computed \d windows?, 5 sampled frames in [\d.]+ s on cpu: [\d.]+ s per sampled frame$",
                         output, re.MULTILINE), output  # fmt: skip
    assert_bucket_whole_and_reported(bucket.bucket, ["b", "c", "long"])
    metadata = json.loads((bucket.bucket / "long" / "long_metadata.json").read_text())
    assert sorted(window["computed_by"]["shard"] for window in metadata["windows"]) == [0, 1, 2]
    # each rank wrote its plan from its own view: the bucket's progress counts all three accounts
    found = read_progress(bucket.bucket)
    assert [(job.shard, job.state, job.exit_status) for job in found.jobs] == [(0, "ended", 0), (1, "ended", 0), (2, "ended", 0)]
    assert found.other_plans == 0 and found.frames_left == 0
    assert {video.key: video.status for video in found.videos} == dict.fromkeys(["b", "c", "long"], "done")
    waited = [max(waits(output)) for _, output in results]
    assert all(seconds <= float(BUCKET_LAG) + 1 for seconds in waited), waited
    print(f"\nseconds each rank waited at its end (BUCKET_LAG {BUCKET_LAG}, lag {LAG}): {waited}")


@pytest.mark.slow
def test_more_jobs_than_workers_a_failed_read_and_a_late_retry_compute_every_window_once(
    tmp_path, make_video, run_block
):
    """Four ranks on two workers, two at a time. Rank 2's first three opens of the long video
    fail and are tried again (its share is unchanged); rank 3's worker cannot read clip b at all,
    so rank 3 computes nothing, says why and exits 1; SkyPilot retries it long after the others.
    Before: the failing rank planned b as one unit, which moved other windows between the shares:
    some computed by no job, some by two, and the summary said `missing` with no reason given."""
    videos = make_videos(tmp_path / "videos", {**LONG, **CLIPS, "d": 2}, make_video)
    logs: list[str] = []
    with LaggingBucket(tmp_path / "pool", workers=2, lag=LAG) as bucket:

        def job(rank: int, worker: int, **envs: str) -> tuple[int, str]:
            status, output = run_block(
                "sam3-job.yaml", bucket.views[worker], rank, 4,
                VIDEO_DIR=str(videos), CHUNK_FRAMES="5", BUCKET_LAG=BUCKET_LAG, **envs,
            )  # fmt: skip
            logs.append(output)
            return status, output

        with ThreadPoolExecutor(max_workers=2) as pool:
            first = list(pool.map(job, [0, 1], [0, 1]))
            flaky = {"PYTHONPATH": FLAKY_READS, "FLAKY_VIDEO": "long.mp4", "FLAKY_READS": "3"}
            second = pool.submit(job, 2, 0, **flaky)
            failing = pool.submit(job, 3, 1, PYTHONPATH=FLAKY_READS, FLAKY_VIDEO="b.mp4")
            second, failing = second.result(), failing.result()
        assert all(status == 0 for status, _ in [*first, second]), [output[-2000:] for _, output in [*first, second]]

        status, output = failing
        assert status == 1, output[-3000:]
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"{videos / 'b.mp4'}: Input/output error" in errors[0], output[-3000:]
        assert "exits 1, to be retried" in errors[0]
        assert computed_windows(output) == [], "a job that cannot make the split computes nothing"

        retry_status, retry = job(3, 1)  # SkyPilot's retry, after every other job has ended
        assert retry_status == 0, retry[-3000:]
        bucket.flush()

    computed = sorted(window for log in logs for window in computed_windows(log))
    assert computed == ["b/0", "c/0", "d/0", "long/0", "long/1", "long/2"], "every window exactly once"
    assert_bucket_whole_and_reported(bucket.bucket, ["b", "c", "d", "long"])
    print(f"\nseconds each job waited at its end: {[max(waits(log), default=0) for log in logs]}")


# ---------------------------------------------------------------------------------------------
# Stale views: nothing another worker finished is deleted or redone
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, Path]:
    """Clip `a` (one window) and video `v` (two windows: 7 and 5 samples) computed in one run:
    (videos folder, output folder)."""
    root = tmp_path_factory.mktemp("finished")
    videos = root / "videos"
    videos.mkdir()
    write_test_video(videos / "a.mp4", seconds=2, fps=5, size=(160, 96))
    write_test_video(videos / "v.mp4", seconds=12, fps=5, size=(160, 96))
    out = root / "out"
    command = [sys.executable, str(REPO / "process_segmentation.py")]
    command += segment([videos], out, tiny_model_dir, "--chunk-frames", "7")
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return videos, out


def copy_results(source: Path, destination: Path, leave_out: list[str]) -> Path:
    shutil.copytree(source, destination, ignore=lambda folder, names: [n for n in names if n in leave_out])
    return destination


@pytest.mark.slow
def test_a_result_that_lands_after_triage_is_not_deleted(tmp_path, finished, tiny_model_dir, capsys, monkeypatch):
    """Shard 1 of 2 (clip a, window 1 of v), restarted while shard 0 was assembling v: its view
    shows neither v's results nor v's window 0 at start; v's metadata and files land while it
    computes a. Before: it removed v's metadata (on a bucket, the object), could not assemble v
    without window 0, and v counted as missing."""
    videos, done = finished
    view = copy_results(done, tmp_path / "view", ["w00000.json", "a", "summary.json", "summary.csv", "index.html"])
    landing = {name: view / "v" / name for name in ("v_metadata.json", "v_segmented.mp4", "v_preview.jpg")}
    for path in landing.values():
        path.unlink()
    compute_unit = computing.process_unit

    def lands_meanwhile(unit, *args, **kwargs):
        if unit.video.key == "a":  # another worker's assembly of v shows up here now
            for name, path in landing.items():
                shutil.copyfile(done / "v" / name, path)
        return compute_unit(unit, *args, **kwargs)

    monkeypatch.setattr(computing, "process_unit", lands_meanwhile)
    arguments = ["--chunk-frames", "7", "--shard-index", "1", "--num-shards", "2", "--bucket-lag", "0"]
    code, stderr = run_cli(segment([videos], view, tiny_model_dir, *arguments), capsys)
    assert code == 0, stderr
    assert f"skip {videos / 'v.mp4'}: completed by another job since this one started" in stderr
    assert (view / "v" / "v_metadata.json").read_bytes() == (done / "v" / "v_metadata.json").read_bytes()
    assert computed_windows(stderr) == ["a/0"]


@pytest.mark.parametrize(("age", "redone"), [(0, False), (3600, True)], ids=["still-arriving", "an-hour-old"])
def test_a_result_missing_a_file_is_redone_only_once_it_is_older_than_the_bucket_lag(
    tmp_path, finished, tiny_model_dir, capsys, age, redone
):
    """v's metadata is there but not its MP4, in a job of a launch of two. Written just now, its
    files are still arriving (on a bucket the big MP4 comes last): nothing is redone. An hour old,
    it is broken: it is assembled again from its windows. (A single job has no other writer to
    wait for: there a missing file is always broken, as test_process_segmentation checks.)"""
    videos, done = finished
    view = copy_results(done, tmp_path / "view", ["v_segmented.mp4"])
    metadata_path = view / "v" / "v_metadata.json"
    metadata = json.loads(metadata_path.read_text())
    written = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=age)
    metadata["completed_at"] = written.isoformat(timespec="seconds")
    metadata_path.write_text(json.dumps(metadata))
    # Shard 0 of 2 holds window 0 of v; a short lag, as the job waits that long for v's MP4 at its end.
    arguments = ["--chunk-frames", "7", "--shard-index", "0", "--num-shards", "2", "--bucket-lag", "3"]
    code, stderr = run_cli(segment([videos], view, tiny_model_dir, *arguments), capsys)
    assert code == 0, stderr
    assert ("redo " in stderr) == redone, stderr
    assert ("still arriving" in stderr) != redone, stderr
    assert (view / "v" / "v_segmented.mp4").exists() == redone
    assert computed_windows(stderr) == [], "the windows are reused either way"
    if not redone:
        assert json.loads(metadata_path.read_text()) == metadata


# ---------------------------------------------------------------------------------------------
# Records checked before use; one video's trouble stays its own
# ---------------------------------------------------------------------------------------------


def summary_statuses(out: Path) -> dict[str, str]:
    return {row["video"]: row["status"] for row in json.loads((out / "summary.json").read_text())["videos"]}


def test_a_window_record_without_a_field_assembly_reads_is_computed_again(tmp_path, finished, tiny_model_dir, capsys):
    """Before: the KeyError escaped, --summarize wrote no summary and no page for the whole
    folder and exited 1, and every rerun failed the video again."""
    videos, done = finished
    out = copy_results(done, tmp_path / "out", ["v_metadata.json"])
    record_path = out / "v" / "windows" / "w00001.json"
    record = json.loads(record_path.read_text())
    del record["last_objects"]  # as an older version, or half of two computations, would leave it
    record_path.write_text(json.dumps(record))

    code, stderr = run_cli(["--summarize", out], capsys)
    assert code == 0, stderr
    assert summary_statuses(out) == {"a": "done", "v": "missing"}
    assert (out / "index.html").is_file()

    code, stderr = run_cli(segment([videos], out, tiny_model_dir, "--chunk-frames", "7"), capsys)
    assert code == 0, stderr
    assert computed_windows(stderr) == ["v/1"], stderr
    assert json.loads((out / "v" / "v_metadata.json").read_text())["status"] == "complete"


def corrupt_tracks_of_window_0(out: Path) -> None:
    """The same size, other bytes: what a size check cannot see."""
    record = json.loads((out / "v" / "windows" / "w00000.json").read_text())
    tracks = out / "v" / "windows" / record["outputs"]["tracks"]["file"]
    data = bytearray(tracks.read_bytes())
    data[-2] = ord("9") if data[-2] != ord("9") else ord("8")
    tracks.write_bytes(bytes(data))


def test_window_files_that_do_not_match_their_sha256_are_dropped_and_computed_again(
    tmp_path, finished, tiny_model_dir, capsys
):
    videos, done = finished
    out = copy_results(done, tmp_path / "out", ["v_metadata.json"])
    corrupt_tracks_of_window_0(out)
    code, stderr = run_cli(["--summarize", out], capsys)
    assert code == 0, stderr
    assert "cannot assemble v: windows whose files are not as recorded" in stderr and "SHA-256" in stderr
    assert not (out / "v" / "windows" / "w00000.json").exists(), "counted as not done from now on"
    assert summary_statuses(out) == {"a": "done", "v": "missing"}

    code, stderr = run_cli(segment([videos], out, tiny_model_dir, "--chunk-frames", "7"), capsys)
    assert code == 0, stderr
    assert computed_windows(stderr) == ["v/0"], stderr
    assert (out / "v" / "v_tracks.jsonl").read_bytes() == (done / "v" / "v_tracks.jsonl").read_bytes()


def test_a_job_that_finds_a_broken_window_at_assembly_computes_it_again_at_once(
    tmp_path, finished, tiny_model_dir, capsys
):
    videos, done = finished
    out = copy_results(done, tmp_path / "out", ["v_metadata.json", "w00001.json"])
    corrupt_tracks_of_window_0(out)
    code, stderr = run_cli(segment([videos], out, tiny_model_dir, "--chunk-frames", "7"), capsys)
    assert code == 0, stderr
    assert f"again {videos / 'v.mp4'} window 0: its files were not as recorded" in stderr
    assert (out / "v" / "v_tracks.jsonl").read_bytes() == (done / "v" / "v_tracks.jsonl").read_bytes()


def test_any_assembly_error_fails_that_video_alone_and_the_summary_is_still_written(
    tmp_path, finished, capsys, monkeypatch
):
    _, done = finished
    out = copy_results(done, tmp_path / "out", ["v_metadata.json", "a_metadata.json"])
    summaries = sam3_pipeline.assembly.object_summaries

    def fails_for_v(windows, mappings):
        if windows[0]["video"]["key"] == "v":
            raise RuntimeError("a bug in one video's assembly")
        return summaries(windows, mappings)

    monkeypatch.setattr(sam3_pipeline.assembly, "object_summaries", fails_for_v)
    code, stderr = run_cli(["--summarize", out], capsys)
    assert code == 0, stderr
    assert "cannot assemble v from its windows: RuntimeError: a bug in one video's assembly" in stderr
    assert summary_statuses(out) == {"a": "done", "v": "missing"}
    assert (out / "index.html").is_file() and (out / "summary.csv").is_file()


# ---------------------------------------------------------------------------------------------
# The same window gives the same bytes on any worker
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("taskset") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores and taskset")
def test_a_window_computed_on_one_core_and_on_two_is_the_same_file(tmp_path, tiny_model_dir):
    """Before: libx264 chose its thread count from the cores, and with it the bytes (30,734 on 2
    cores, 30,506 on 1), so a record from one worker and an MP4 from another did not match."""
    # Large enough for libx264 to use more than one thread per core (at 160x96 it never does).
    clip = write_test_video(tmp_path / "a.mp4", seconds=2, fps=5, size=(640, 360))
    names = {}
    for cores in ("0", "0,1"):
        out = tmp_path / f"cores-{cores}"
        command = ["taskset", "-c", cores, sys.executable, str(REPO / "process_segmentation.py")]
        command += segment([clip], out, tiny_model_dir, "--sample-fps", "5")
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        names[cores] = sorted(path.name for path in (out / "a" / "windows").iterdir() if path.suffix != ".json")
        names[cores].append(hashlib.sha256((out / "a" / "a_segmented.mp4").read_bytes()).hexdigest())
    assert names["0"] == names["0,1"], "the window files (named by their SHA-256) and the MP4"
