"""bench/benchmark.py in its small mode, so that the benchmark cannot rot unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_benchmark_small_mode_measures_both_approaches_and_fills_a_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- benchmark:start -->\nold table\n<!-- benchmark:end -->\n\ntail\n")
    completed = subprocess.run(
        [sys.executable, str(REPO / "bench" / "benchmark.py"), "--small", "--readme", str(readme)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    rows = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    assert [row["frames"] for row in rows] == [3, 6]
    for row in rows:
        for approach in ("ours", "naive"):
            assert row[approach]["frames"] == row["frames"]
            assert row[approach]["frames_per_second"] > 0 and row[approach]["peak_rss_mb"] > 100

    text = readme.read_text()
    assert "old table" not in text and text.endswith("<!-- benchmark:end -->\n\ntail\n")
    table = [line for line in text.splitlines() if line.startswith("| 3 ") or line.startswith("| 6 ")]
    assert len(table) == 2 and all(line.count("|") == 7 for line in table)
