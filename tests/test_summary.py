"""`process_segmentation.py --summarize DIR`: the summary of an output folder.

From a real run with the tiny SAM3 (one good video, one broken) and from folders laid out by
hand for each state a video can be in, plus several processes summarizing one folder at once.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import process_segmentation as ps
from conftest import REPO

PROMPTS = ["soccer player", "ball"]
CSV_COLUMNS = ["video", "status", "frames_processed", "objects_detected", "processing_seconds", "decode_error", "error"]


def run_cli(args: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """main() in this process; returns (exit code, stdout, stderr)."""
    try:
        code = ps.main([str(arg) for arg in args])
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_summary(output_dir: Path) -> tuple[dict, list[dict[str, str]]]:
    """summary.json as parsed, and summary.csv's rows."""
    summary = json.loads((output_dir / "summary.json").read_text())
    with open(output_dir / "summary.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    return summary, rows


def lay_out(output_dir: Path, stem: str, files: dict[str, dict | str]) -> None:
    """A video's folder as a run leaves it: suffix ("_metadata.json") -> JSON object or raw text.

    A metadata object's `outputs` name files by suffix and size ({"video": ("_segmented.mp4", 3)});
    each becomes the record a run writes for that file.
    """
    folder = output_dir / stem
    folder.mkdir(parents=True)
    for suffix, content in files.items():
        if isinstance(content, dict) and "outputs" in content:
            outputs = {
                key: {"file": f"{stem}{name_suffix}", "bytes": size}
                for key, (name_suffix, size) in content["outputs"].items()
            }
            content = {**content, "outputs": outputs}
        text = content if isinstance(content, str) else json.dumps(content)
        (folder / f"{stem}{suffix}").write_text(text)


def complete(frames: int = 3, per_prompt: dict[str, int] | None = None) -> dict[str, dict | str]:
    """The files of a video that is done: its MP4, and metadata saying complete that lists it."""
    per_prompt = {"soccer player": 2, "ball": 1} if per_prompt is None else per_prompt
    metadata = {
        "status": "complete",
        "frames_processed": frames,
        "objects_detected": sum(per_prompt.values()),
        "objects_per_prompt": per_prompt,
        "processing_seconds": 1.5,
        "outputs": {"video": ("_segmented.mp4", 3)},
    }
    return {"_metadata.json": metadata, "_segmented.mp4": "mp4"}


FAILED = {"_error.json": {"status": "failed", "error": "x.mp4: not a readable video: Invalid data"}}


def test_summary_counts_match_folder_after_run_with_failing_video(
    tmp_path, tiny_model_dir, make_video, capsys
):
    videos, out = tmp_path / "videos", tmp_path / "out"
    videos.mkdir()
    good = make_video(videos / "good.mp4", seconds=1, size=(160, 96))
    broken = videos / "broken.mp4"
    broken.write_bytes(b"not a video" * 100)
    code, _, _ = run_cli(
        [good, broken, "--output-dir", out, "--model", tiny_model_dir, "--device", "cpu"], capsys
    )
    assert code == 1
    make_video(videos / "later.mp4", seconds=1, size=(160, 96))  # in the dataset, never processed

    code, stdout, _ = run_cli(["--summarize", out], capsys)
    assert code == 0  # a report: failed videos do not fail it
    summary, rows = read_summary(out)
    assert summary["counts"] == {"done": 1, "partial": 0, "failed": 1, "missing": 0}
    assert summary["output_dir"] == str(out)
    by_video = {row["video"]: row for row in summary["videos"]}
    assert sorted(by_video) == ["broken", "good"]
    metadata = json.loads((out / "good" / "good_metadata.json").read_text())
    for key in ("frames_processed", "objects_detected", "objects_per_prompt", "processing_seconds"):
        assert by_video["good"][key] == metadata[key]
    assert by_video["good"]["status"] == "done" and by_video["good"]["error"] is None
    error = json.loads((out / "broken" / "broken_error.json").read_text())["error"]
    assert by_video["broken"] == {
        "video": "broken",
        "status": "failed",
        "frames_processed": None,
        "objects_detected": None,
        "objects_per_prompt": {},
        "processing_seconds": None,
        "decode_error": None,
        "error": error,
    }
    assert [(row["video"], row["status"]) for row in rows] == [("broken", "failed"), ("good", "done")]
    assert rows[1]["objects:soccer player"] == str(metadata["objects_per_prompt"]["soccer player"])
    assert f"  failed: broken: {error}" in stdout.splitlines()

    # With the dataset as INPUT, its video that has no folder counts as missing.
    code, stdout, _ = run_cli(["--summarize", out, videos], capsys)
    assert code == 0
    summary, rows = read_summary(out)
    assert summary["counts"] == {"done": 1, "partial": 0, "failed": 1, "missing": 1}
    assert [(row["video"], row["status"]) for row in rows][-1] == ("later", "missing")
    assert [line.split() for line in stdout.splitlines()[1:5]] == [
        ["done", "1"],
        ["partial", "0"],
        ["failed", "1"],
        ["missing", "1"],
    ]


@pytest.mark.parametrize(
    ("files", "status"),
    [
        (complete(), "done"),
        ({**complete(), **FAILED}, "done"),
        (FAILED, "failed"),
        ({"_metadata.json": complete()["_metadata.json"]}, "missing"),
        ({**complete(), "_segmented.mp4": "mp"}, "missing"),
        ({"_segmented.mp4": "mp4"}, "missing"),
        ({"_metadata.json": '{"status": "compl'}, "missing"),
    ],
    ids=[
        "complete",
        "complete-after-a-failure",
        "failed",
        "metadata-without-mp4",
        "mp4-cut-short",
        "mp4-without-metadata",
        "torn-metadata",
    ],
)
def test_summary_status_of_one_video_folder(tmp_path, capsys, files, status):
    lay_out(tmp_path, "clip", files)
    code, _, _ = run_cli(["--summarize", tmp_path], capsys)
    assert code == 0
    summary, rows = read_summary(tmp_path)
    assert [row["status"] for row in summary["videos"]] == [row["status"] for row in rows] == [status]
    assert summary["counts"][status] == 1 and sum(summary["counts"].values()) == 1
    assert (summary["videos"][0]["error"] is not None) == (status == "failed")


@pytest.mark.parametrize(
    ("inputs", "missing"),
    [([], []), (["videos"], ["b", "c"]), (["videos/a.mp4", "videos/c.mp4", "gone.mp4"], ["c", "gone"])],
    ids=["no-inputs", "input-folder", "input-files"],
)
def test_summary_counts_inputs_without_folder_as_missing(tmp_path, make_video, capsys, inputs, missing):
    out = tmp_path / "out"
    lay_out(out, "a", complete())
    lay_out(out, "failed-elsewhere", FAILED)  # not among the inputs: still in the summary
    (tmp_path / "videos").mkdir()
    for stem in "abc":
        make_video(tmp_path / "videos" / f"{stem}.mp4", seconds=1, size=(160, 96))
    code, _, _ = run_cli(["--summarize", out, *(tmp_path / path for path in inputs)], capsys)
    assert code == 0
    summary, rows = read_summary(out)
    assert summary["counts"] == {"done": 1, "partial": 0, "failed": 1, "missing": len(missing)}
    assert [row["video"] for row in rows if row["status"] == "missing"] == missing
    assert len(rows) == 2 + len(missing)


def test_summary_csv_has_documented_columns(tmp_path, capsys):
    lay_out(tmp_path, "match", complete(frames=5))
    lay_out(tmp_path, "rerun", complete(frames=2, per_prompt={"goalkeeper": 1, "ball": 0}))
    lay_out(tmp_path, "broken", FAILED)
    code, _, _ = run_cli(["--summarize", tmp_path], capsys)
    assert code == 0
    with open(tmp_path / "summary.csv", newline="") as file:
        reader = csv.DictReader(file)
        rows = {row["video"]: row for row in reader}
    prompt_columns = ["objects:soccer player", "objects:ball", "objects:goalkeeper"]  # first seen first
    assert reader.fieldnames == [*CSV_COLUMNS[:4], *prompt_columns, *CSV_COLUMNS[4:]]
    assert rows["match"] == {
        "video": "match",
        "status": "done",
        "frames_processed": "5",
        "objects_detected": "3",
        "objects:soccer player": "2",
        "objects:ball": "1",
        "objects:goalkeeper": "",
        "processing_seconds": "1.5",
        "decode_error": "",
        "error": "",
    }
    assert (rows["rerun"]["objects:soccer player"], rows["rerun"]["objects:goalkeeper"]) == ("", "1")
    assert rows["broken"]["error"] == FAILED["_error.json"]["error"]
    assert rows["broken"]["frames_processed"] == rows["broken"]["objects:ball"] == ""


# Waits for the start signal (so that the racers really overlap), then summarizes again and again.
RACER = """
import sys, time
from pathlib import Path
import process_segmentation as ps
output_dir, go, rounds = sys.argv[1:]
while not Path(go).exists():
    time.sleep(0.005)
for _ in range(int(rounds)):
    assert ps.main(["--summarize", output_dir]) == 0
"""


def test_summary_read_by_a_reader_that_stops_early_ends_quietly(tmp_path):
    """`--summarize DIR | head -1`: the reader is gone before the counts are printed. The files
    are written all the same, and the run ends without a traceback."""
    for i in range(20):
        lay_out(tmp_path, f"clip{i:02d}", FAILED)
    reader, writer = os.pipe()
    os.close(reader)  # gone before the script prints anything: every print meets a closed pipe
    summarizer = subprocess.run(
        [sys.executable, str(REPO / "process_segmentation.py"), "--summarize", str(tmp_path)],
        stdout=writer,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(writer)
    assert summarizer.returncode == 141, summarizer.stderr  # 128 + SIGPIPE, as a shell reports it
    assert summarizer.stderr == ""
    assert read_summary(tmp_path)[0]["counts"]["failed"] == 20
    assert (tmp_path / "index.html").is_file()


@pytest.mark.slow
def test_summary_racing_runs_leave_valid_files(tmp_path):
    out, go = tmp_path / "out", tmp_path / "go"
    stems = [f"clip{i:03d}" for i in range(150)]
    for i, stem in enumerate(stems):
        lay_out(out, stem, FAILED if i % 3 == 0 else complete(frames=i))
    expected = {"done": 100, "partial": 0, "failed": 50, "missing": 0}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(out), str(go), "8"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    time.sleep(0.5)
    go.touch()
    seen = 0
    while any(racer.poll() is None for racer in racers):  # every version a reader sees is whole
        if (out / "summary.csv").exists():  # written after summary.json
            summary, rows = read_summary(out)
            assert summary["counts"] == expected and len(rows) == len(stems)
            seen += 1
        time.sleep(0.01)
    for racer in racers:
        assert racer.wait() == 0, racer.stderr.read()[-2000:]
    summary, rows = read_summary(out)
    assert summary["counts"] == expected
    assert [row["video"] for row in rows] == [row["video"] for row in summary["videos"]] == stems
    assert not [path.name for path in out.iterdir() if path.name.endswith(".partial")]
    print(f"\n4 racers x 8 summaries of {len(stems)} videos; the reader saw {seen} whole versions")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--summarize", "{tmp}/nope"], "nope: no such output folder to summarize"),
        ([], "required: inputs"),
        (["--summarize", "{tmp}", "{tmp}/empty"], "folder has no video files"),
    ],
    ids=["missing-dir", "no-inputs-without-summarize", "input-folder-without-videos"],
)
def test_summary_usage_error_exits_2_with_one_line(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    code, stdout, stderr = run_cli([arg.format(tmp=tmp_path) for arg in args], capsys)
    assert code == 2
    assert message in stderr.splitlines()[-1]
    assert not (tmp_path / "summary.json").exists() and not stdout


def test_a_failed_video_removed_from_the_dataset_is_left_out_of_the_summary(
    tmp_path, tiny_model_dir, make_video, capsys
):
    videos = tmp_path / "videos"
    videos.mkdir()
    make_video(videos / "good.mp4", seconds=1, fps=5, size=(160, 96))
    (videos / "broken.mp4").write_bytes(b"not a video" * 100)
    out = tmp_path / "out"
    code, _, _ = run_cli([videos, "--output-dir", out, "--model", tiny_model_dir, "--device", "cpu"], capsys)
    assert code == 1
    run_cli(["--summarize", out, videos], capsys)
    assert read_summary(out)[0]["counts"]["failed"] == 1  # while it is in the dataset
    (videos / "broken.mp4").unlink()  # the user removes the file that could not be read

    code, stdout, stderr = run_cli(["--summarize", out, videos], capsys)
    assert code == 0, stderr
    summary, rows = read_summary(out)
    assert summary["counts"] == {"done": 1, "partial": 0, "failed": 0, "missing": 0}
    assert [row["video"] for row in rows] == ["good"]
    assert "broken" not in (out / "index.html").read_text()
    assert "left out 1 failed video(s) no longer among the inputs: broken" in stderr

    code, _, _ = run_cli(["--summarize", out], capsys)  # no dataset given: every record is reported
    assert read_summary(out)[0]["counts"]["failed"] == 1
