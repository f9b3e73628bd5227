"""The job's `run` block, executed by bash exactly as written in sam3-job.yaml, one process per rank.

Each rank gets the YAML's envs (as SkyPilot exports them) pointed at a folder of synthetic videos,
the tiny model and its own output folder, so that what a rank did can be read from its outputs:
a video processed by two ranks, or by none, shows. VENV_DIR points the block's `source` line at
the venv running these tests, and DEVICE=cpu replaces the YAMLs' cuda.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import PROMPTS, yaml_task

from sam3_pipeline import gpu_share

# Name -> seconds. Names sort against durations, so cutting the sorted list into equal counts
# (the upstream example's way) would give one share 10 s and another 3 s.
CLIPS = {"a1": 4, "a2": 3, "a3": 3, "b1": 2, "b2": 2, "b3": 2, "c1": 1, "c2": 1, "c3": 1}
FEW_CLIPS = {"a1": 4, "b1": 2, "c1": 1}


def make_clips(folder: Path, clips: dict[str, int], make_video) -> Path:
    folder.mkdir()
    for stem, seconds in clips.items():
        make_video(folder / f"{stem}.mp4", seconds=seconds, fps=5, size=(160, 96))
    return folder


def completed(output_dir: Path) -> dict[str, dict]:
    """Stem -> metadata of every video this output folder holds as complete."""
    found = {}
    for path in sorted(output_dir.glob("*/*_metadata.json")):
        metadata = json.loads(path.read_text())
        if (
            metadata.get("status") == "complete"
            and (path.parent / f"{path.parent.name}_segmented.mp4").is_file()
        ):
            found[path.parent.name] = metadata
    return found


def summary_counts(output_dir: Path) -> dict[str, int]:
    """The counts of the summary the run block refreshes at the end of every job."""
    return json.loads((output_dir / "summary.json").read_text())["counts"]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder with its mtime and size; the summary, the results page and the jobs'
    accounts (.jobs/), which every job rewrites, left out."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in folder.rglob("*")
        if p.name not in ("summary.json", "summary.csv", "index.html", ".jobs") and p.parent.name != ".jobs"
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("num_jobs", "clips"),
    [(1, CLIPS), (2, CLIPS), (3, CLIPS), (7, CLIPS), (5, FEW_CLIPS)],
    ids=["1-job", "2-jobs", "3-jobs", "7-jobs", "more-jobs-than-videos"],
)
def test_job_shares_cover_every_video_once(tmp_path, make_video, run_block, num_jobs, clips):
    videos = make_clips(tmp_path / "videos", clips, make_video)
    outputs = [tmp_path / f"out-rank{rank}" for rank in range(num_jobs)]

    def job(rank: int):
        if num_jobs == 1:  # plain `sky launch` sets neither variable: the block defaults to 0 of 1
            return run_block("sam3-job.yaml", outputs[rank], VIDEO_DIR=str(videos))
        return run_block("sam3-job.yaml", outputs[rank], rank, num_jobs, VIDEO_DIR=str(videos))

    with ThreadPoolExecutor(max_workers=2) as pool:  # two cores in CI
        results = list(pool.map(job, range(num_jobs)))
    for rank, (status, output) in enumerate(results):
        assert status == 0, f"rank {rank} of {num_jobs} failed:\n{output[-3000:]}"

    shares = [completed(out) for out in outputs]
    names = [sorted(share) for share in shares]
    logs = "\n".join(f"--- rank {rank}:\n{output[-1500:]}" for rank, (_, output) in enumerate(results))
    assert sorted(sum(names, [])) == sorted(clips), f"every video exactly once; shares: {names}\n{logs}"
    # each rank's summary and results page: its share done, the rest of the dataset missing
    for share, out in zip(names, outputs, strict=True):
        missing = len(clips) - len(share)
        assert summary_counts(out) == {"done": len(share), "partial": 0, "failed": 0, "missing": missing}
        page = (out / "index.html").read_text()
        cards = re.findall(r'<li class="card" data-status="(\w+)"', page)
        assert (cards.count("done"), cards.count("missing")) == (len(share), missing)
    for share in shares:
        for stem, metadata in share.items():
            assert metadata["source_path"] == str(videos / f"{stem}.mp4")
            assert metadata["prompts"] == PROMPTS
            assert metadata["frames_processed"] == clips[stem]  # 1 frame per second of video

    # Shares are weighed by the frames each window is expected to hold: here one window per video,
    # one frame per second of video.
    loads = [sum(clips[stem] for stem in share) for share in names]
    ideal = sum(clips.values()) / num_jobs
    largest = max(range(num_jobs), key=lambda rank: loads[rank])
    # Within one window of the ideal: without its last (smallest) video, the largest share is at most ideal.
    assert loads[largest] - min(clips[stem] for stem in names[largest]) <= ideal, (loads, ideal)
    print(
        f"\n{num_jobs} jobs, {len(clips)} videos ({sum(clips.values())} s): videos per share "
        f"{[len(share) for share in names]}, seconds per share {loads}: {names}"
    )

    # A recovered job (same rank) finds its videos complete and does nothing.
    before = snapshot(outputs[largest])
    status, output = job(largest)
    assert status == 0, output[-3000:]
    assert snapshot(outputs[largest]) == before


@pytest.mark.slow
def test_job_run_failed_video_fails_job(tmp_path, make_video, run_block):
    videos = make_clips(tmp_path / "videos", {"good": 1}, make_video)
    (videos / "broken.mp4").write_bytes(b"not a video" * 100)
    status, output = run_block("sam3-job.yaml", tmp_path / "out", VIDEO_DIR=str(videos))
    assert status == 1, output[-3000:]
    assert sorted(completed(tmp_path / "out")) == ["good"]
    assert (tmp_path / "out" / "broken" / "broken_error.json").is_file()
    assert summary_counts(tmp_path / "out") == {"done": 1, "partial": 0, "failed": 1, "missing": 0}  # written all the same


def test_job_run_without_gpu_fails_job(tmp_path, make_video, run_block):
    """With the YAML's DEVICE, a worker whose PyTorch sees no GPU fails instead of running on the CPU."""
    videos = make_clips(tmp_path / "videos", {"good": 1}, make_video)
    status, output = run_block(
        "sam3-job.yaml",
        tmp_path / "out",
        VIDEO_DIR=str(videos),
        DEVICE=yaml_task("sam3-job.yaml")["envs"]["DEVICE"],
        CUDA_VISIBLE_DEVICES="",  # no GPU, on any machine
    )
    assert status == 2, output[-3000:]
    assert any(line.startswith("error: ") and "CUDA" in line for line in output.splitlines()), output[-3000:]
    assert completed(tmp_path / "out") == {}


@pytest.mark.slow
def test_single_run_max_videos_subset(tmp_path, make_video, run_block):
    videos = make_clips(tmp_path / "videos", FEW_CLIPS, make_video)
    status, output = run_block(
        "sam3-test-single.yaml", tmp_path / "out", VIDEO_DIR=str(videos), MAX_VIDEOS="2"
    )
    assert status == 0, output[-3000:]
    assert sorted(completed(tmp_path / "out")) == ["a1", "b1"]  # the first two by name
    assert summary_counts(tmp_path / "out") == {
        "done": 2,
        "partial": 0,
        "failed": 0,
        "missing": 1,
    }  # of the whole VIDEO_DIR


@pytest.mark.parametrize("made", [False, True], ids=["no-such-folder", "folder-without-videos"])
def test_a_video_dir_without_videos_stops_the_job_in_one_line(tmp_path, run_block, made):
    videos = tmp_path / "matches"
    if made:
        videos.mkdir()
        (videos / "notes.txt").write_text("not a video")
    status, output = run_block("sam3-job.yaml", tmp_path / "out", 0, 2, VIDEO_DIR=str(videos))
    assert status == 2, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(videos) in errors[0], output[-3000:]
    assert not (tmp_path / "out" / "summary.json").exists()


def result_files(output_dir: Path) -> dict[str, bytes]:
    """Each video's overlay, tracks and MOT file, by path under the output folder."""
    patterns = ("*/*_segmented.mp4", "*/*_tracks.jsonl", "*/*_mot.txt")
    return {str(p.relative_to(output_dir)): p.read_bytes() for pattern in patterns for p in output_dir.glob(pattern)}


@pytest.mark.slow
def test_two_processes_on_the_gpu_give_the_outputs_of_one(tmp_path, make_video, run_block):
    videos = make_clips(tmp_path / "videos", FEW_CLIPS, make_video)  # a1 is 2 windows of 3 frames
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"out-{processes}"
        status, output = run_block(
            "sam3-job.yaml", out, VIDEO_DIR=str(videos), CHUNK_FRAMES="3", PROCESSES_PER_GPU=str(processes)
        )
        assert status == 0, output[-3000:]
        assert summary_counts(out) == {"done": len(FEW_CLIPS), "partial": 0, "failed": 0, "missing": 0}
        runs[processes] = (result_files(out), output)
    assert len(runs[1][0]) == 3 * len(FEW_CLIPS)
    assert runs[2][0] == runs[1][0], "the same files, byte for byte"
    shares = re.findall(r"shard (\d)/(\d): ", runs[2][1])
    assert sorted(shares) == [("0", "2"), ("1", "2")], runs[2][1][-3000:]


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_processes_per_gpu_that_is_not_a_whole_number_stops_the_job_in_one_line(tmp_path, run_block, value):
    videos = tmp_path / "videos"
    videos.mkdir()
    status, output = run_block("sam3-job.yaml", tmp_path / "out", VIDEO_DIR=str(videos), PROCESSES_PER_GPU=value)
    assert status == 2, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: PROCESSES_PER_GPU={value}: give a whole number of 1 or more"], output[-3000:]


def test_processes_per_gpu_beyond_the_free_memory_are_refused_naming_what_fits():
    each = gpu_share.process_gb(chunk_frames=100, objects=25)
    assert gpu_share.refusal(2, 100, 25, free_gb=45.0) is None  # an L40S's 48 GB, less the driver's
    reason = gpu_share.refusal(12, 100, 25, free_gb=45.0)
    assert reason.startswith("PROCESSES_PER_GPU=12: ") and f"use PROCESSES_PER_GPU={int(45 * 0.9 // each)}" in reason
    assert gpu_share.refusal(1, 100, 25, free_gb=2.0).endswith("the GPU has 2.0 GB free")
    assert gpu_share.process_gb(100, 25) == gpu_share.process_gb(17, 25), "the fast step keeps 17 frames"
    assert gpu_share.process_gb(100, 50) > each
