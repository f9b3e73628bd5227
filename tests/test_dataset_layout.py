"""Videos found as datasets lay them out: keyed by their path, outputs mirrored under OUTPUT_DIR.

A dataset with repeated file names in nested folders, run at once and as three jobs of the job's
run block; a flat folder, whose outputs keep the paths they always had; and each problem found in
review (outputs read as inputs, macOS AppleDouble files, folders that are not videos in the
summary, a different video under an old name, shares that a failed duration probe changed),
reproduced as it was reported.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import process_segmentation as ps
from sam3_pipeline import dataset, options, planning
from sam3_pipeline.dataset import assign_units, collect_videos
from test_job_shares import snapshot
from test_summary import FAILED, complete, lay_out, read_summary, run_cli

# Key -> seconds: three videos named 1.mp4 in different folders, one of them two folders deep.
NESTED = {"x/1": 1, "y/1": 2, "y/z/1": 3, "2": 1}
OUTPUT_SUFFIXES = ["_metadata.json", "_mot.txt", "_preview.jpg", "_segmented.mp4", "_tracks.jsonl"]


def make_dataset(folder: Path, videos: dict[str, int], make_video, suffix: str = ".mp4") -> Path:
    """One short clip per key, `folder/<key><suffix>`, `seconds` long at 5 frames/s."""
    for key, seconds in videos.items():
        path = folder / f"{key}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        make_video(path, seconds=seconds, fps=5, size=(160, 96))
    return folder


def segment(inputs: list[Path], output_dir: Path, model_dir: Path, *extra: str) -> list[object]:
    return [*inputs, "--output-dir", output_dir, "--model", model_dir, "--device", "cpu", *extra]


def result_files(output_dir: Path) -> list[str]:
    """Every file below `output_dir` as a relative path; the summary and the results page, the
    windows each video was assembled from (test_windows.py covers those) and the jobs' accounts
    (test_progress.py), left out."""
    return sorted(
        p.relative_to(output_dir).as_posix()
        for p in output_dir.rglob("*")
        if p.is_file()
        and p.name not in ("summary.json", "summary.csv", "index.html")
        and p.parent.name not in ("windows", ".jobs")
    )


def expected_files(keys) -> list[str]:
    """The files a complete run writes for these keys: OUTPUT_DIR/<key>/<name>_..."""
    return sorted(f"{key}/{key.rsplit('/', 1)[-1]}{suffix}" for key in keys for suffix in OUTPUT_SUFFIXES)


def check_metadata(output_dir: Path, dataset: Path, videos: dict[str, int]) -> None:
    """Each key's metadata: complete, naming its key and its source, one frame per second."""
    for key, seconds in videos.items():
        name = key.rsplit("/", 1)[-1]
        metadata = json.loads((output_dir / key / f"{name}_metadata.json").read_text())
        source = dataset / f"{key}.mp4"
        assert metadata["status"] == "complete"
        assert metadata["key"] == key and metadata["source_path"] == str(source)
        assert metadata["source_name"] == metadata["video_name"] == source.name
        assert metadata["source_bytes"] == source.stat().st_size
        assert metadata["frames_processed"] == seconds
        assert metadata["output_video"] == str(output_dir / key / f"{name}_segmented.mp4")


def skipped(stderr: str) -> list[str]:
    """The videos a run's log says it skipped as complete."""
    return sorted(line.split()[1].rstrip(":") for line in stderr.splitlines() if line.startswith("skip "))


# ---------------------------------------------------------------------------------------------
# Nested datasets
# ---------------------------------------------------------------------------------------------


def test_nested_dataset_mirrors_its_folders_rerun_skips_and_summary_lists_keys(
    tmp_path, tiny_model_dir, make_video, monkeypatch, capsys
):
    dataset = make_dataset(tmp_path / "videos", NESTED, make_video)
    out = tmp_path / "out"
    loads = []
    real_load = ps.load_segmenter
    monkeypatch.setattr(ps, "load_segmenter", lambda *a: loads.append(a) or real_load(*a))

    code, _, stderr = run_cli(segment([dataset], out, tiny_model_dir), capsys)
    assert code == 0, stderr
    assert result_files(out) == expected_files(NESTED)
    check_metadata(out, dataset, NESTED)

    before = snapshot(out)
    code, _, stderr = run_cli(segment([dataset], out, tiny_model_dir), capsys)
    assert code == 0 and len(loads) == 1, "a complete rerun does not even load the model"
    assert skipped(stderr) == sorted(str(dataset / f"{key}.mp4") for key in NESTED)
    assert snapshot(out) == before

    (dataset / "y" / "z" / "later.mp4").write_bytes((dataset / "2.mp4").read_bytes())  # not processed yet
    code, _, _ = run_cli(["--summarize", out, dataset], capsys)
    assert code == 0
    summary, rows = read_summary(out)
    expected = [("2", "done"), ("x/1", "done"), ("y/1", "done"), ("y/z/1", "done"), ("y/z/later", "missing")]
    assert [(row["video"], row["status"]) for row in summary["videos"]] == expected
    assert [(row["video"], row["status"]) for row in rows] == expected
    assert summary["counts"] == {"done": 4, "partial": 0, "failed": 0, "missing": 1}
    assert [row["frames_processed"] for row in summary["videos"][:4]] == [1, 1, 2, 3]


@pytest.mark.slow
def test_nested_dataset_as_three_jobs_of_the_run_block(tmp_path, make_video, run_block):
    """The pool's way: three jobs, one output folder (the bucket); each video done by exactly one."""
    dataset = make_dataset(tmp_path / "videos", NESTED, make_video)
    out = tmp_path / "out"

    def jobs() -> list[str]:
        with ThreadPoolExecutor(max_workers=2) as pool:  # two cores in CI
            results = list(
                pool.map(lambda rank: run_block("sam3-job.yaml", out, rank, 3, VIDEO_DIR=str(dataset)), range(3))
            )
        for rank, (status, output) in enumerate(results):
            assert status == 0, f"rank {rank} of 3 failed:\n{output[-3000:]}"
        return [output for _, output in results]

    outputs = jobs()
    shares = []
    for rank, output in enumerate(outputs):
        [line] = [line for line in output.splitlines() if line.startswith(f"shard {rank}/3: ")]
        shares.append(sorted(filter(None, re.sub(r"^shard \d/3: \d+ videos?, \d+ windows?, ~\d+ sampled frames: ?", "", line).split(", "))))
    assert sorted(sum(shares, [])) == sorted(NESTED), f"every key in exactly one share: {shares}"
    assert result_files(out) == expected_files(NESTED)
    check_metadata(out, dataset, NESTED)
    assert ps.main(["--summarize", str(out), str(dataset)]) == 0  # the jobs' own summaries race each other
    summary, _ = read_summary(out)
    assert [(row["video"], row["status"]) for row in summary["videos"]] == [
        (key, "done") for key in sorted(NESTED)
    ]

    # Recovered jobs (same ranks) find every video complete.
    before = snapshot(out)
    outputs = jobs()
    assert sorted(sum((skipped(output) for output in outputs), [])) == sorted(
        str(dataset / f"{key}.mp4") for key in NESTED
    )
    assert snapshot(out) == before


def test_flat_folder_keeps_the_outputs_and_paths_it_always_had(tmp_path, tiny_model_dir, make_video, capsys):
    dataset = make_dataset(tmp_path / "videos", {"match": 2, "half1": 1}, make_video)
    (dataset / "broken.mp4").write_bytes(b"not a video" * 100)
    out = tmp_path / "out"
    code, _, stderr = run_cli(segment([dataset], out, tiny_model_dir), capsys)
    assert code == 1, stderr
    assert result_files(out) == sorted(["broken/broken_error.json", *expected_files(["match", "half1"])])
    check_metadata(out, dataset, {"match": 2, "half1": 1})
    error = json.loads((out / "broken" / "broken_error.json").read_text())
    assert (error["key"], error["source_path"]) == ("broken", str(dataset / "broken.mp4"))

    # Results written before keys and source sizes were recorded are still complete.
    for key in ("match", "half1"):
        path = out / key / f"{key}_metadata.json"
        metadata = json.loads(path.read_text())
        for field in ("key", "source_name", "source_bytes"):
            del metadata[field]
        path.write_text(json.dumps(metadata))
    (dataset / "broken.mp4").unlink()
    code, _, stderr = run_cli(segment([dataset], out, tiny_model_dir), capsys)
    assert code == 0 and skipped(stderr) == [str(dataset / "half1.mp4"), str(dataset / "match.mp4")]


@pytest.mark.parametrize(
    ("layout", "inputs", "key"),
    [
        (["day1/a/b.mp4", "day2/a/b.mp4"], ["day1", "day2"], "a/b"),
        (["day1/b.mp4", "day2/b.mp4"], ["day1/b.mp4", "day2/b.mp4"], "b"),
        (["day1/b.mkv", "day1/b.mp4"], ["day1"], "b"),
    ],
    ids=["folders-holding-one-path", "files-of-one-name", "one-name-two-extensions"],
)
def test_inputs_with_one_key_are_a_usage_error_naming_both(tmp_path, tiny_model_dir, capsys, layout, inputs, key):
    for name in layout:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"video")
    code, _, stderr = run_cli(segment([tmp_path / p for p in inputs], tmp_path / "out", tiny_model_dir), capsys)
    assert code == 2
    [line] = [line for line in stderr.splitlines() if line.startswith("error: ")]
    second, first = (tmp_path / name for name in layout)  # the one found second is named first
    assert line.startswith(f"error: {first} and {second} would both write to <output-dir>/{key}/: "), line
    assert "give the folder that holds both" in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Found in review
# ---------------------------------------------------------------------------------------------


def test_output_folder_inside_the_input_folder_is_never_read(tmp_path, tiny_model_dir, make_video, capsys):
    """`python process_segmentation.py videos --output-dir videos/results`, twice."""
    videos = make_dataset(tmp_path / "videos", {"match": 1}, make_video)
    results = videos / "results"
    for _ in range(2):
        code, _, stderr = run_cli(segment([videos], results, tiny_model_dir), capsys)
        assert code == 0, stderr
    assert skipped(stderr) == [str(videos / "match.mp4")] and "1/1 - " not in stderr
    assert result_files(results) == expected_files(["match"])
    # The same folder by other names: compared resolved.
    (tmp_path / "link").symlink_to(results)
    for other in (tmp_path / "link", videos / ".." / "videos" / "results"):
        assert [video.key for video in collect_videos([videos], other)] == ["match"]
    assert ps.main(["--summarize", str(results), str(videos)]) == 0
    assert [row["video"] for row in read_summary(results)[0]["videos"]] == ["match"]


def test_output_folder_that_is_the_input_folder_gives_no_inputs(tmp_path, tiny_model_dir, make_video, capsys):
    """`python process_segmentation.py videos --output-dir videos`, twice: videos/match/match_segmented.mp4
    is a result, not a video; so is day1/half1/half1_segmented.mp4 when day1 is the input folder."""
    videos = make_dataset(tmp_path / "videos", {"match": 1, "day1/half1": 1}, make_video)
    for _ in range(2):
        code, _, stderr = run_cli(segment([videos], videos, tiny_model_dir), capsys)
        assert code == 0, stderr
    assert skipped(stderr) == [str(videos / "day1" / "half1.mp4"), str(videos / "match.mp4")]
    assert set(result_files(videos)) == {"match.mp4", "day1/half1.mp4", *expected_files(["match", "day1/half1"])}
    assert [video.key for video in collect_videos([videos / "day1"], videos)] == ["half1"]


def test_current_folder_with_the_default_output_folder(tmp_path, tiny_model_dir, make_video, monkeypatch, capsys):
    """`python process_segmentation.py .`, twice, where ./segmentation_results is the default."""
    monkeypatch.setattr(options, "default_output_dir", lambda: Path("segmentation_results"))  # as without /outputs
    monkeypatch.chdir(make_dataset(tmp_path / "here", {"match": 1}, make_video))
    for _ in range(2):
        code, _, stderr = run_cli([".", "--model", tiny_model_dir, "--device", "cpu"], capsys)
        assert code == 0, stderr
    assert skipped(stderr) == ["match.mp4"] and "1/1 - " not in stderr
    assert result_files(Path("segmentation_results")) == expected_files(["match"])


@pytest.mark.parametrize("given", ["folder", "files"], ids=["folder", "files-as-find-lists-them"])
def test_apple_double_and_hidden_files_are_not_videos(tmp_path, tiny_model_dir, make_video, capsys, given):
    """What unzipping a zip made on a Mac leaves: `__MACOSX/._x.mp4` and `._x.mp4` beside `x.mp4`."""
    videos = make_dataset(tmp_path / "videos", {"x": 1}, make_video)
    resource_fork = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(4000)
    hidden = [videos / "._x.mp4", videos / "__MACOSX" / "._x.mp4", videos / ".cache" / "clip.mp4"]
    for path in hidden:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(resource_fork)
    inputs = [videos] if given == "folder" else [videos / "x.mp4", *hidden[:2]]
    code, _, stderr = run_cli(segment(inputs, tmp_path / "out", tiny_model_dir), capsys)
    assert code == 0, stderr
    assert result_files(tmp_path / "out") == expected_files(["x"])
    if given == "files":
        assert [line.split(":")[0] for line in stderr.splitlines() if line.startswith("ignore ")] == [
            f"ignore {path}" for path in hidden[:2]
        ]


def test_summary_counts_only_folders_with_results(tmp_path, capsys):
    out = tmp_path / "out"
    lay_out(out, "clip", complete())
    lay_out(out / "x", "1", FAILED)  # nested: out/x/1/1_error.json
    (out / "logs").mkdir()
    (out / "logs" / "job-0.log").write_text("Job rank 0 of 1\n")
    (out / "tmp" / "scratch").mkdir(parents=True)
    (out / ".cache").mkdir()
    (out / ".cache" / ".cache_metadata.json").write_text("{}")
    code, _, _ = run_cli(["--summarize", out], capsys)
    assert code == 0
    summary, rows = read_summary(out)
    assert [(row["video"], row["status"]) for row in rows] == [("clip", "done"), ("x/1", "failed")]
    assert summary["counts"] == {"done": 1, "partial": 0, "failed": 1, "missing": 0}


def test_a_different_video_under_an_old_name_is_redone(tmp_path, tiny_model_dir, make_video, capsys):
    """`one.mp4` processed, then `one.mkv` into the same output folder; then one.mkv replaced."""
    videos, out = tmp_path / "videos", tmp_path / "out"
    metadata_path = out / "one" / "one_metadata.json"
    make_dataset(videos, {"one": 1}, make_video)
    assert run_cli(segment([videos], out, tiny_model_dir), capsys)[0] == 0

    (videos / "one.mp4").unlink()
    make_dataset(videos, {"one": 2}, make_video, suffix=".mkv")
    code, _, stderr = run_cli(segment([videos], out, tiny_model_dir), capsys)
    assert code == 0 and not skipped(stderr)
    assert f"redo {videos / 'one.mkv'}: the results in {out / 'one'} were made from one.mp4, not one.mkv" in stderr
    metadata = json.loads(metadata_path.read_text())
    assert (metadata["source_name"], metadata["frames_processed"]) == ("one.mkv", 2)

    size = (videos / "one.mkv").stat().st_size
    make_dataset(videos, {"one": 3}, make_video, suffix=".mkv")  # same name, another video
    code, _, stderr = run_cli(segment([videos], out, tiny_model_dir), capsys)
    assert code == 0 and not skipped(stderr)
    new_size = (videos / "one.mkv").stat().st_size
    assert f"were made from a file of {size} bytes, one.mkv has {new_size}" in stderr
    assert json.loads(metadata_path.read_text())["frames_processed"] == 3

    # Metadata from before sizes were recorded: the size is unknown, which alone redoes nothing.
    metadata = json.loads(metadata_path.read_text())
    del metadata["source_bytes"], metadata["source_name"]
    metadata_path.write_text(json.dumps(metadata))
    code, _, stderr = run_cli(segment([videos], out, tiny_model_dir), capsys)
    assert code == 0 and skipped(stderr) == [str(videos / "one.mkv")]


def test_shares_do_not_change_when_a_duration_probe_fails_once(tmp_path, make_video, monkeypatch):
    """A read that fails once on one worker (a bucket mount's transient error) gives that job the
    same shares as the others: every job plans every video's windows from its duration."""
    clips = {"a/1": 4, "a/2": 3, "b/1": 2, "b/2": 2, "c": 1, "d": 1}
    videos = make_dataset(tmp_path / "videos", clips, make_video)
    args = options.parse_args([str(videos), "--chunk-frames", "3"])

    def shares() -> list[list[tuple[str, int]]]:
        found = collect_videos([videos], tmp_path / "out")
        settings = options.RunSettings.of(args)
        units = [
            unit
            for video in found
            for unit in planning.units_of(video, planning.plan_video(video, settings), args.chunk_frames)
        ]
        shards = assign_units(units, 3)
        return [[(unit.video.key, unit.first) for unit, shard in zip(units, shards) if shard == rank] for rank in range(3)]

    everywhere = shares()
    assert sorted(key for share in everywhere for key, _ in share if _ == 0) == sorted(clips)
    real_open = planning.av.open
    failed = []

    def failing_open(file, *args, **kwargs):
        if str(file) == str(videos / "a" / "2.mp4") and not failed:
            failed.append(file)
            raise OSError(5, "Input/output error", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(planning.av, "open", failing_open)
    assert shares() == everywhere
    assert failed, "the probe failed once"


def failing_for(path: Path, original, times: int | None):
    """`original` (Path.stat, os.scandir), raising EIO for `path` the first `times` calls (None: always)."""
    failures = []

    def call(target, *args, **kwargs):
        if str(target) == str(path) and (times is None or len(failures) < times):
            failures.append(target)
            raise OSError(5, "Input/output error", str(target))
        return original(target, *args, **kwargs)

    return call


@pytest.mark.parametrize("what", ["video", "folder"])
def test_a_listing_that_fails_stops_the_job_in_one_line_before_any_share(
    tmp_path, tiny_model_dir, make_video, capsys, monkeypatch, what
):
    """A folder or a listed video this worker cannot read (a bucket mount's I/O error, which other
    workers need not get) would give this job a share made from part of the listing: it makes none."""
    videos = make_dataset(tmp_path / "videos", {"a/1": 1, "b/1": 1}, make_video)
    broken = videos / "b" / "1.mp4" if what == "video" else videos / "b"
    monkeypatch.setattr(dataset, "LIST_RETRY_SECONDS", 0)
    if what == "video":
        monkeypatch.setattr(Path, "stat", failing_for(broken, Path.stat, times=None))
    else:
        monkeypatch.setattr(os, "scandir", failing_for(broken, os.scandir, times=None))
    out = tmp_path / "out"
    code, _, stderr = run_cli(segment([videos], out, tiny_model_dir, "--shard-index", "1", "--num-shards", "2"), capsys)
    assert code == 1
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(broken) in errors[0] and "Input/output error" in errors[0], stderr
    assert "Traceback" not in stderr
    assert not out.exists(), "no share, no account, no output"


def test_a_listed_video_whose_size_fails_once_is_listed_alike(tmp_path, make_video, monkeypatch):
    videos = make_dataset(tmp_path / "videos", {"a/1": 1, "b/1": 2}, make_video)
    expected = collect_videos([videos], tmp_path / "out")
    monkeypatch.setattr(dataset, "LIST_RETRY_SECONDS", 0)
    monkeypatch.setattr(Path, "stat", failing_for(videos / "b" / "1.mp4", Path.stat, times=2))
    assert collect_videos([videos], tmp_path / "out") == expected
