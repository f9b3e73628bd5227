"""The benchmarks in their small modes, so that none can rot unnoticed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO


@pytest.mark.slow
def test_benchmark_small_mode_measures_both_approaches_and_fills_the_performance_page(tmp_path):
    page = tmp_path / "performance.md"  # --readme with no path writes docs/performance.md
    page.write_text("# x\n\n<!-- benchmark:start -->\nold table\n<!-- benchmark:end -->\n\ntail\n")
    completed = subprocess.run(
        [sys.executable, str(REPO / "bench" / "benchmark.py"), "--small", "--readme", str(page)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    rows = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    assert [row["frames"] for row in rows] == [3, 6]
    for row in rows:
        for approach in ("ours", "serial", "sam3", "naive"):
            assert row[approach]["frames"] == row["frames"]
            assert row[approach]["frames_per_second"] > 0 and row[approach]["peak_rss_mb"] > 100
        assert row["ours"]["seconds"] > row["sam3"]["seconds"], "SAM3 alone is the floor"
        assert set(row["ours"]["stage_seconds"]) == set(row["serial"]["stage_seconds"]) >= {"decode", "sam3", "encode"}

    text = page.read_text()
    assert "old table" not in text and text.endswith("<!-- benchmark:end -->\n\ntail\n")
    assert re.search(r"<!-- benchmark:start -->\nMeasured \d{4}-\d{2}-\d{2}\. Synthetic 320x180 clip", text), "its date"
    table = [line for line in text.splitlines() if line.startswith("| 3 ") or line.startswith("| 6 ")]
    assert len(table) == 2 and all(line.count("|") == 9 for line in table)
    assert "| decode | preprocess | sam3 |" in text, "the time per stage"


@pytest.mark.slow
def test_benchmark_full_size_smoke_runs_one_frame_of_the_full_size_model(tmp_path):
    # ~2.5 minutes on the 2-core CI machine: a 22 s model build (3.3 GB, deleted after), ~110 s per frame.
    with tempfile.TemporaryDirectory() as cache:
        completed = subprocess.run(
            [sys.executable, str(REPO / "bench" / "benchmark.py"), "--full-size", "--smoke", "--device", "cpu"]
            + ["--cache-dir", cache, "--json", str(tmp_path / "full.json"), "--log-dir", str(tmp_path / "logs")],
            capture_output=True,
            text=True,
            timeout=900,
        )
    assert completed.returncode == 0, completed.stderr[-3000:]

    report = json.loads((tmp_path / "full.json").read_text())
    [run] = report["runs"]
    assert run["frames"] == 1 and run["objects_last_frame"] == 20
    assert run["frames_per_second"] > 0 and run["peak_rss_mb"] > 3000  # 860M float32 parameters alone are 3.4 GB
    # SAM3 stores each frame at 1008x1008, float32: the full-size input, not the tiny model's
    assert report["summary"]["session per stored frame"] == pytest.approx(3 * 1008 * 1008 * 4 / 1e6, abs=0.1)
    assert "| 20 (20) | 1 | 100 |" in completed.stdout


def test_progress_benchmark_builds_a_launch_and_times_the_command(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(REPO / "bench" / "progress_bench.py"), "--windows", "200", "--jobs", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.splitlines()[-1])
    assert result["windows"] == 200 and result["files"] == 1 + 3  # the plan and one account per job
    assert result["command_s_best_of_5"] > 0
    assert "windows         99 / 200 (50%)" in completed.stdout


def test_tracks_reader_benchmark_reads_every_mask_of_a_file_it_writes():
    completed = subprocess.run(
        [sys.executable, str(REPO / "bench" / "tracks_reader_bench.py"), "--frames", "20"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout)
    assert result["frames"] == 20 and result["objects"] == 500
    assert result["mask_pixels"] > 500 * 78 and result["peak_rss_mb"] > 0  # every mask decoded (a ball is ~78 px)


@pytest.mark.slow
def test_the_gpu_study_rehearsed_on_the_cpu_fills_every_part_of_its_table(tmp_path):
    venv = Path(sys.executable).parent  # gpu_check.sh runs python3 from PATH
    env = {**os.environ, "SMALL": "1", "OUT": str(tmp_path), "PATH": f"{venv}:{os.environ['PATH']}"}
    completed = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=600, env=env
    )
    assert completed.returncode == 0, completed.stderr[-3000:] + completed.stdout[-3000:]

    results = json.loads((tmp_path / "results.json").read_text())
    speed = {(row["step"], row["objects"]): row for row in results["speed"]}
    assert set(speed) == {(step, objects) for step in ("stock", "fast") for objects in (10, 20)}
    assert all(row["objects_seen"] == objects for (_, objects), row in speed.items())
    assert all(row["frames_per_second"] > 0 and row["peak_memory_mb"] > 100 for row in speed.values())
    phases = results["phases"]
    for kind in ("profiled", "wall"):
        parts = [phases[f"{phase}_{kind}_ms"] for phase in ("backbone", "detector", "tracker")]
        assert all(part > 0 for part in parts) and sum(parts) < phases[f"frame_{kind}_ms"]
    assert [row["name"] for row in results["processes"]] == ["1 side by side", "2 side by side"]
    assert all(row["frames_per_second"] > 0 for row in results["processes"]), results["processes"]
    table = (tmp_path / "table.md").read_text()
    assert "x86_64" in table and "transformers 5.24.0" in table, "the machine and versions"
    assert "| compiled | - | - | not run on the CPU" in table
