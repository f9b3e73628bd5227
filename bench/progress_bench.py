"""How long `python3 -m sam3_pipeline.progress` takes on a big launch, and what the jobs' accounts
cost to keep: a plan of WINDOWS windows (videos of 33 windows of 100 sampled frames, the last of
50) split over JOBS jobs, half of each job's share computed, its account rewritten after each
window as a job does (`progress.JobLog`). Standard library only, like the command.

Usage:
  python3 bench/progress_bench.py                  # 10,000 windows, 10 jobs
  python3 bench/progress_bench.py --windows 1000 --jobs 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sam3_pipeline.progress import JOBS_FOLDER, JobLog, launch_plan, read_progress, report  # noqa: E402

WINDOWS_PER_VIDEO = 33


def build(output_dir: Path, windows: int, jobs: int) -> list[float]:
    """Write the plan and every job's account; returns the seconds of each account rewrite."""
    videos: dict[str, list[tuple[int, int]]] = {}
    for index in range(windows):
        key = f"train/{index // WINDOWS_PER_VIDEO:05d}/match"
        last = index % WINDOWS_PER_VIDEO == WINDOWS_PER_VIDEO - 1 or index == windows - 1
        videos.setdefault(key, []).append((50 if last else 100, index % jobs))
    plan = launch_plan(videos, [], jobs, {"prompts": ["soccer player", "ball"], "sample_fps": "1", "chunk_frames": 100})
    rewrites = []
    for shard in range(jobs):
        job = JobLog(output_dir, plan, shard, "cuda", print)
        share = [
            (key, window, frames)
            for key, planned in videos.items()
            for window, (frames, owner) in enumerate(planned)
            if owner == shard
        ]
        for key, window, frames in share[: len(share) // 2]:
            started = time.perf_counter()
            job.computed(key, window, frames, frames * 0.5)
            rewrites.append(time.perf_counter() - started)
    return rewrites


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        output_dir = Path(folder)
        rewrites = build(output_dir, args.windows, args.jobs)
        files = sorted((output_dir / JOBS_FOLDER).iterdir())
        in_process = []
        for _ in range(5):
            started = time.perf_counter()
            report(read_progress(output_dir), datetime.datetime.now(datetime.timezone.utc))
            in_process.append(time.perf_counter() - started)
        command = [sys.executable, "-S", "-m", "sam3_pipeline.progress", str(output_dir)]
        whole = []
        for _ in range(5):
            started = time.perf_counter()
            shown = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
            whole.append(time.perf_counter() - started)
        result = {
            "windows": args.windows,
            "jobs": args.jobs,
            "files": len(files),
            "kB": round(sum(path.stat().st_size for path in files) / 1000, 1),
            "largest_account_kB": round(
                max(path.stat().st_size for path in files if path.name != "plan.json") / 1000, 1
            ),
            "account_rewrite_ms_last": round(rewrites[-1] * 1000, 2),
            "read_and_report_s_best_of_5": round(min(in_process), 3),
            "command_s_best_of_5": round(min(whole), 3),
        }
        print(shown.stdout.split("\njobs:")[0])
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
