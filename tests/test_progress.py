"""`python3 -m sam3_pipeline.progress OUTPUT_DIR`: what the jobs' accounts in OUTPUT_DIR/.jobs/ say
while they run, after a restart, with a failed video, and on a machine without the pipeline's
dependencies."""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys

import pytest

from conftest import REPO, run_cli, segment, write_test_video
from sam3_pipeline import options, planning, progress
from sam3_pipeline.dataset import assign_units, collect_videos
from sam3_pipeline.outputs import output_paths
from sam3_pipeline.progress import ENDED, JobLog, launch_plan, read_progress, report

SETTINGS = {"prompts": ["ball"], "sample_fps": "1", "chunk_frames": 100}
NOW = datetime.datetime(2026, 12, 5, 12, 0, tzinfo=datetime.timezone.utc)


def windows_line(text: str) -> tuple[int, int]:
    done, total = re.search(r"^  windows +([\d,]+) / ([\d,]+)", text, re.MULTILINE).groups()
    return int(done.replace(",", "")), int(total.replace(",", ""))


def test_a_run_keeps_its_account_window_by_window_and_the_report_follows_it(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    """Two shards, one after the other, of a 12 s video in windows of 5 samples (3 windows) and a
    clip: after each window SAM3 finishes, the report counts it; after shard 0, shard 1 has not
    started; after both, every window is done and nothing is left."""
    videos = tmp_path / "videos"
    videos.mkdir()
    write_test_video(videos / "long.mp4", seconds=12, fps=5, size=(160, 96))
    write_test_video(videos / "clip.mp4", seconds=2, fps=5, size=(160, 96))
    out = tmp_path / "out"
    seen: list[tuple[int, int]] = []
    computed = JobLog.computed

    def and_report(self, key, window, frames, seconds):
        computed(self, key, window, frames, seconds)
        seen.append(windows_line(report(read_progress(out), NOW)))

    monkeypatch.setattr(JobLog, "computed", and_report)
    arguments = ["--chunk-frames", "5", "--num-shards", "2", "--bucket-lag", "0"]
    code, stderr = run_cli(segment([videos], out, tiny_model_dir, *arguments, "--shard-index", "0"), capsys)
    assert code == 0, stderr
    after_first = read_progress(out)
    share = sum(len(video["shards"]) - video["shards"].count(1) for video in after_first.plan["videos"].values())
    assert seen == [(done, 4) for done in range(1, share + 1)], "one window more after each, of 3 + 1"
    assert [(job.shard, job.state, job.exit_status) for job in after_first.jobs] == [(0, ENDED, 0)]
    text = report(after_first, NOW)
    assert "2 jobs: 0 running, 0 waiting for other jobs' windows, 1 ended, 1 not started" in text
    assert re.search(r"s per sampled frame on cpu, over \d+ frames computed", text), text
    assert "no job is running" in text, "work is left and no job computes it"

    code, stderr = run_cli(segment([videos], out, tiny_model_dir, *arguments, "--shard-index", "1"), capsys)
    assert code == 0, stderr
    done = read_progress(out)
    assert [video.status for video in done.videos] == ["done", "done"]
    assert done.frames_left == 0 and [job.state for job in done.jobs] == [ENDED, ENDED]
    # the plan's windows are those the video has on disk, and its frames those computed
    long = next(video for video in done.videos if video.key == "long")
    assert len(long.frames) == len(json.loads((out / "long" / "long_metadata.json").read_text())["windows"]) == 3
    assert sum(job.frames for job in done.jobs) == 12 + 2
    text = report(done, NOW)
    assert windows_line(text) == (4, 4) and "time left       none: every window is done" in text


def test_a_failed_video_is_counted_listed_with_its_reason_and_not_left_to_do(tmp_path, tiny_model_dir, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_test_video(videos / "good.mp4", seconds=1.0)
    (videos / "bad.mp4").write_bytes(b"not a video at all")
    out = tmp_path / "out"
    code, stderr = run_cli(segment([videos], out, tiny_model_dir), capsys)
    assert code == 1
    found = read_progress(out)
    assert {video.key: video.status for video in found.videos} == {"bad": "failed", "good": "done"}
    assert found.frames_left == 0, "a failed video is not work still to come"
    text = report(found, NOW)
    assert "1 failed" in text and re.search(r"^  bad +failed +windows 0 / 1, .*: .*bad\.mp4: ", text, re.MULTILINE), (
        text
    )
    assert [(job.state, job.exit_status) for job in found.jobs] == [(ENDED, 1)]


def plan_of(videos: dict[str, list[tuple[int, int]]], num_shards: int, complete=()) -> dict:
    return launch_plan(videos, complete, num_shards, SETTINGS)


def test_time_left_is_the_frames_left_at_the_speed_so_far_over_the_jobs_running(tmp_path):
    """Two of three jobs running, one not started: 1,000 frames planned, 300 computed in 150 s."""
    plan = plan_of({"a": [(100, 0)] * 5, "b": [(100, 1)] * 3 + [(100, 2)] * 2}, 3)
    first = JobLog(tmp_path, plan, 0, "cuda", print)
    first.save()
    for window in range(2):
        first.computed("a", window, 100, 50.0)
    second = JobLog(tmp_path, plan, 1, "cuda", print)
    second.save()
    second.computed("b", 0, 100, 50.0)
    found = read_progress(tmp_path)
    assert found.seconds_per_frame == pytest.approx(0.5)
    assert found.frames_left == 700 and found.running == 2
    assert found.seconds_left() == pytest.approx(700 * 0.5 / 2)
    text = report(found, NOW)
    assert "3 jobs: 2 running, 0 waiting for other jobs' windows, 0 ended, 1 not started" in text
    assert "~3 min with 2 jobs at once (~6 min of one job's work" in text
    assert "~300 / 1,000 (30%)" in text
    assert re.search(r"^  a +in progress +windows 2 / 5, ~200 / ~500 frames$", text, re.MULTILINE), text


def test_a_restarted_job_keeps_what_it_computed_and_earlier_plans_are_not_counted(tmp_path):
    plan = plan_of({"a": [(10, 0), (10, 0)]}, 1)
    job = JobLog(tmp_path, plan, 0, "cuda", print)
    job.computed("a", 0, 10, 4.0)  # then the worker is preempted: the account stays "running"
    assert read_progress(tmp_path).jobs[0].state == "running"
    again = JobLog(tmp_path, plan, 0, "cuda", print)  # SkyPilot's recovery, on another worker
    again.done_before("a", [0])
    again.save()
    found = read_progress(tmp_path)
    assert [(job.starts, job.frames, job.windows_done) for job in found.jobs] == [(2, 10, 1)]
    assert "started 2 times" in report(found, NOW)

    other = plan_of({"a": [(10, 0), (10, 1)]}, 2)  # a new launch, in two jobs
    JobLog(tmp_path, other, 1, "cuda", print).save()
    found = read_progress(tmp_path)
    assert found.plan["plan_id"] == other["plan_id"] and [job.shard for job in found.jobs] == [1]
    assert found.other_plans == 1 and "1 accounts of jobs with another plan" in report(found, NOW)


def test_an_error_that_ends_the_run_ends_the_account(tmp_path):
    plan = plan_of({"a": [(10, 0)]}, 1)
    with pytest.raises(KeyboardInterrupt), JobLog(tmp_path, plan, 0, "cuda", print):
        raise KeyboardInterrupt
    [job] = read_progress(tmp_path).jobs
    assert (job.state, job.exit_status) == (ENDED, 130)


def test_an_unwritable_account_is_one_warning_and_the_job_goes_on(tmp_path):
    (tmp_path / progress.JOBS_FOLDER).write_text("a file where the folder should be")
    warnings: list[str] = []
    job = JobLog(tmp_path, plan_of({"a": [(10, 0)]}, 1), 0, "cpu", warnings.append)
    job.computed("a", 0, 10, 1.0)
    job.state(ENDED, 0)
    assert len(warnings) == 1 and "progress only; the results are not affected" in warnings[0]


def test_the_command_runs_on_python_without_site_packages_and_says_one_line_without_a_plan(tmp_path):
    """-S: no site-packages (no PyTorch, PyAV, numpy), as on a laptop that only copied .jobs/."""
    plan = plan_of({"match": [(100, 0)] * 3}, 1, complete=["match"])
    JobLog(tmp_path, plan, 0, "cuda", print).state(ENDED, 0)
    command = [sys.executable, "-S", "-m", "sam3_pipeline.progress"]
    shown = subprocess.run([*command, str(tmp_path), "--all"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^  match +done +windows 3 / 3, ~300 / ~300 frames$", shown.stdout, re.MULTILINE), shown.stdout

    empty = tmp_path / "empty"
    empty.mkdir()
    missing = subprocess.run([*command, str(empty)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.count("\n") == 1 and missing.stderr.startswith("error: ") and "no job" in missing.stderr


def test_every_job_of_a_launch_writes_the_same_plan(tmp_path, make_video):
    """Each rank plans alone, from its own view: the plans (and so their IDs) must agree, or the
    report would count no job's account."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for name, seconds in {"long": 12, "b": 2, "c": 1}.items():
        make_video(videos / f"{name}.mp4", seconds=seconds, fps=5, size=(160, 96))
    plans = []
    for rank in range(3):
        args = options.parse_args([str(videos), "--chunk-frames", "5", "--shard-index", str(rank), "--num-shards", "3"])
        settings = options.RunSettings.of(args)
        found = collect_videos(args.inputs, tmp_path / "out")
        paths_of = {video: output_paths(tmp_path / "out", video.key) for video in found}
        triaged = planning.triage(found, paths_of, settings, options.Share.of(args), overwrite=False)
        units = [unit for video in found for unit in planning.units_of(video, triaged.plans[video], args.chunk_frames)]
        shards = assign_units(units, 3)
        windows = planning.planned_windows(units, shards, triaged.plans, args.chunk_frames)
        plans.append(launch_plan(windows, [], 3, settings.record()))
    assert len({plan["plan_id"] for plan in plans}) == 1
    assert plans[0]["videos"]["long"] == {"frames": [5, 4, 3], "shards": [0, 1, 2]}
