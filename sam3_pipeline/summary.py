"""`--summarize`: done, partial, failed and missing videos of an output folder, as JSON, CSV and a short table;
videos whose windows are all done are assembled first."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sam3_pipeline.assembly import assemble_and_record
from sam3_pipeline.dataset import collect_videos, is_hidden
from sam3_pipeline.files import now_iso, read_record, write_json, write_text_atomically
from sam3_pipeline.messages import UsageError, log, one_line
from sam3_pipeline.outputs import completed_metadata, output_paths
from sam3_pipeline.page import PAGE_NAME, results_page
from sam3_pipeline.windows import WINDOWS_FOLDER, BrokenWindows, complete_run, done_windows


def result_keys(output_dir: Path) -> set[str]:
    """The keys of the videos `output_dir` holds results or error records of: the folders below it,
    at any depth, that hold a file this script names after the folder (`en/en_metadata.json`).
    Other folders (logs, temporary files) are not videos."""
    keys = set()
    for parent, folders, files in os.walk(output_dir):
        folders[:] = [name for name in folders if not is_hidden(name)]
        key = Path(os.path.relpath(parent, output_dir)).as_posix()
        if key == ".":
            continue
        paths = output_paths(output_dir, key)
        named = not set(files).isdisjoint(path.name for kind, path in paths.items() if kind != "folder")
        if named or WINDOWS_FOLDER in folders:
            keys.add(key)
    return keys


def same_source(record: dict[str, Any]) -> bool:
    """Whether the video a window was computed from is still there as it was (its name and size):
    windows of a file since replaced or removed are not assembled."""
    try:
        size = Path(record["video"]["source_path"]).stat().st_size
    except OSError:
        return False
    return size == record["recipe"]["source_bytes"]


def assemble_ready(output_dir: Path, keys: Sequence[str]) -> None:
    """Assemble the videos among `keys` whose windows are all done but that have no complete
    metadata with whole files here: the jobs that computed their last windows may each have
    missed the other's, and a result still on its way from another worker is made again here
    from the same windows (the same bytes), so that this summary can say what the bucket will
    hold. Whatever goes wrong with one video is logged and leaves the others alone; windows
    found broken are dropped, to be computed again."""
    for key in keys:
        paths = output_paths(output_dir, key)
        if completed_metadata(paths):
            continue
        try:
            windows = complete_run(done_windows(paths["folder"]))
            if windows is None or not same_source(windows[0]):
                continue
            assemble_and_record(paths, windows)
        except BrokenWindows as error:  # dropped by now: the next run computes them
            log(f"cannot assemble {key}: {error}")
            continue
        except Exception as error:  # one video's trouble never costs the others their summary
            log(f"cannot assemble {key} from its windows: {type(error).__name__}: {one_line(error)}")
            continue
        log(f"assembled {key} from its {len(windows)} window{'s' if len(windows) > 1 else ''}")


def removed(output_dir: Path, key: str) -> bool:
    """Whether the file a failed video's error record names is gone from where it was."""
    source = read_record(output_paths(output_dir, key)["error"]).get("source_path")
    return bool(source) and not os.path.lexists(source)


def summary_row(output_dir: Path, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """One video's entry in the summary, from what its folder under `output_dir` holds, and its
    complete metadata ({} unless done or partial).

    done: complete metadata with every output it lists whole (`completed_metadata`);
    partial: the same, but decoding stopped before the end of the video (a file cut short);
    failed: an error record; missing: none of these (not started, in progress, interrupted,
    cut off while uploading, or no folder at all).
    """
    paths = output_paths(output_dir, key)
    metadata = completed_metadata(paths)
    failure = {} if metadata else read_record(paths["error"])
    if metadata:
        status = "partial" if metadata.get("decode_error") else "done"
    elif failure.get("status") == "failed":
        status = "failed"
    else:
        status = "missing"
    row = {
        "video": key,
        "status": status,
        "frames_processed": metadata.get("frames_processed"),
        "objects_detected": metadata.get("objects_detected"),
        "objects_per_prompt": metadata.get("objects_per_prompt", {}),
        "processing_seconds": metadata.get("processing_seconds"),
        "decode_error": metadata.get("decode_error"),
        "error": failure.get("error") if status == "failed" else None,
    }
    return row, metadata


def summary_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as CSV text, one line per video.

    Columns: video, status, frames_processed, objects_detected, then `objects:<prompt>` for each
    prompt any video was run with (first seen first; empty where that video's run did not have
    it), then processing_seconds, decode_error, error. Empty cells where there is no value.
    """
    prompts = dict.fromkeys(prompt for row in rows for prompt in row["objects_per_prompt"])
    columns = ["video", "status", "frames_processed", "objects_detected"]
    columns += [f"objects:{prompt}" for prompt in prompts] + ["processing_seconds", "decode_error", "error"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {**row, **{f"objects:{prompt}": n for prompt, n in row["objects_per_prompt"].items()}}
        )
    return text.getvalue()


def print_summary(output_dir: Path, counts: dict[str, int], rows: Sequence[dict[str, Any]]) -> None:
    """A short table on stdout: videos per status, then each failed video with its error."""
    print(f"{len(rows)} videos in {output_dir} (summary.json, summary.csv, {PAGE_NAME})")
    for status, count in counts.items():
        print(f"  {status:<8} {count:>6}")
    for row in rows:
        if row["status"] == "failed":
            print(f"  failed: {row['video']}: {row['error']}")
        elif row["status"] == "partial":
            print(f"  partial: {row['video']}: {row['decode_error']}")


def summarize(output_dir: Path, inputs: Sequence[Path]) -> None:
    """Write summary.json, summary.csv and the results page (index.html, `page.results_page`)
    into `output_dir` and print the counts.

    The videos are those `output_dir` holds results or error records of (`result_keys`), and those
    among `inputs` (files or folders, as for a run), which count as missing when they have neither;
    with `inputs`, a failed video that is no longer among them and whose file is gone (removed
    from the dataset) is left out, with a note: its failure is no longer the dataset's.
    A report: failed videos are not an error here. Jobs may run it at the same time.
    """
    if not output_dir.is_dir():
        raise UsageError(f"{output_dir}: no such output folder to summarize")
    videos = collect_videos(inputs, output_dir)
    try:
        keys = result_keys(output_dir) | {video.key for video in videos}
        assemble_ready(output_dir, sorted(keys))
        results = [summary_row(output_dir, key) for key in sorted(keys)]
        if inputs:  # the dataset as it is now: a failure of a video removed from it is no longer news
            dataset = {video.key for video in videos}
            gone = [
                row["video"]
                for row, _ in results
                if row["status"] == "failed" and row["video"] not in dataset and removed(output_dir, row["video"])
            ]
            results = [(row, metadata) for row, metadata in results if row["video"] not in gone]
            if gone:
                log(f"note: left out {len(gone)} failed video(s) no longer among the inputs: {', '.join(gone)}")
        rows = [row for row, _ in results]
        counts = {
            status: sum(row["status"] == status for row in rows)
            for status in ("done", "partial", "failed", "missing")
        }
        summary = {"generated_at": now_iso(), "output_dir": str(output_dir), "counts": counts, "videos": rows}
        write_json(output_dir / "summary.json", summary)
        write_text_atomically(output_dir / "summary.csv", summary_csv(rows))
        metadatas = {row["video"]: metadata for row, metadata in results if metadata}
        write_text_atomically(output_dir / PAGE_NAME, results_page(output_dir, summary, metadatas))
    except OSError as error:
        raise UsageError(f"{output_dir}: cannot summarize: {one_line(error)}") from None
    print_summary(output_dir, counts, rows)
