"""Every frame where it belongs: sampling on coarse time bases, timestamps that restart, streams
that change size, non-square pixels, the bounds of --sample-fps, and what a redo or a killed run
leaves behind.

Inputs come from Debian's ffmpeg (its muxers round times the way real files do); what is checked
is what a user gets: the frames in the MP4, its frame rate and duration, the picture, the
metadata and the summary.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

import sam3_pipeline.assembly
from conftest import failure_lines, run_cli, segment
from ffmpeg_tools import decode_rgb, ffmpeg, ffprobe_stream, frame_times, require_ffmpeg
from sam3_pipeline.files import partial_path
from sam3_pipeline.outputs import STALE_PARTIAL_SECONDS
from sam3_pipeline.video_io import DecodeReport, SampledFrame, sample_frames

require_ffmpeg()


def lavfi_clip(size: str, rate: str, seconds: float) -> list[str]:
    return ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds}"]


def segment_one(
    capsys: pytest.CaptureFixture[str], video: Path, out: Path, model: Path, *extra: str
) -> tuple[int, str, dict]:
    """One run on one video with the tiny model on the CPU: (exit code, stderr, its metadata or {})."""
    code, stderr = run_cli(segment([video], out, model, *extra), capsys)
    metadata_file = out / video.stem / f"{video.stem}_metadata.json"
    return code, stderr, json.loads(metadata_file.read_text()) if metadata_file.exists() else {}


def output_video(out: Path, video: Path) -> Path:
    return out / video.stem / f"{video.stem}_segmented.mp4"


def sampled(video: Path, sample_fps: Fraction | float) -> tuple[list[SampledFrame], DecodeReport]:
    report = DecodeReport()
    with av.open(str(video)) as container:
        return list(sample_frames(container, sample_fps, max_frames=0, report=report)), report


# ---------------------------------------------------------------------------------------------
# Sampling on coarse time bases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "rate", "sample_fps"),
    [("mkv30.mkv", "30", "30"), ("ntsc.mkv", "30000/1001", "30000/1001"), ("vp9.webm", "25", "25")],
    ids=["mkv-30fps-at-30", "mkv-29.97fps-at-30000/1001", "webm-25fps-at-25"],
)
def test_at_the_source_rate_every_frame_is_kept(tmp_path, tiny_model_dir, capsys, name, rate, sample_fps):
    """Matroska and WebM store milliseconds: 33, 67, 100 ms fall just before the 1/30 s grid."""
    video = tmp_path / name
    codec = ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8"] if name.endswith("webm") else []
    ffmpeg(*lavfi_clip("160x120", rate, 2), *codec, video)
    source = ffprobe_stream(video)
    out = tmp_path / "out"
    code, stderr, metadata = segment_one(capsys, video, out, tiny_model_dir, "--sample-fps", sample_fps, "--no-tracks")

    assert code == 0, stderr
    assert metadata["frames_processed"] == source["nb_read_frames"] == round(2 * Fraction(rate))
    assert metadata["sample_fps"] == metadata["output_fps"] == float(Fraction(sample_fps))
    mp4 = ffprobe_stream(output_video(out, video))
    assert mp4["nb_read_frames"] == source["nb_read_frames"]
    assert mp4["avg_frame_rate"] == Fraction(rate)
    assert mp4["duration"] == pytest.approx(2.0, abs=0.01), "the MP4 plays as long as the video"


def test_each_sample_is_the_frame_nearest_its_time_on_a_millisecond_time_base(tmp_path):
    """30 fps in Matroska at 7.5 and 1 samples per second: sample k within half a frame of k / rate."""
    video = tmp_path / "mkv30.mkv"
    ffmpeg(*lavfi_clip("160x120", "30", 4), video)
    for rate in (Fraction(15, 2), Fraction(1)):
        samples, _ = sampled(video, rate)
        assert len(samples) == 4 * rate
        errors = [sample.timestamp - k / rate for k, sample in enumerate(samples)]
        assert all(-1 / 60 < error <= 1 / 60 for error in errors), errors


# ---------------------------------------------------------------------------------------------
# Timestamps that restart
# ---------------------------------------------------------------------------------------------


def joined_parts(folder: Path, sizes: list[str], offsets: list[float] | None = None) -> Path:
    """1 s MPEG-TS parts at 10 fps joined with `cat`, as camera and broadcast recorders leave them.
    Each part's timestamps start where its offset says (default: all at the same time, so they
    restart at every join)."""
    joined = folder / "joined.ts"
    with joined.open("wb") as whole:
        for index, size in enumerate(sizes):
            part = folder / f"part{index}.ts"
            offset = ["-output_ts_offset", str(offsets[index])] if offsets else []
            ffmpeg(*lavfi_clip(size, "10", 1), "-c:v", "libx264", *offset, "-f", "mpegts", part)
            whole.write(part.read_bytes())
    return joined


def test_timestamps_that_restart_keep_every_frame(tmp_path, tiny_model_dir, capsys):
    video = joined_parts(tmp_path, ["160x120"] * 3)
    assert ffprobe_stream(video)["nb_read_frames"] == 30
    out = tmp_path / "out"
    code, stderr, metadata = segment_one(capsys, video, out, tiny_model_dir, "--sample-fps", "0", "--no-tracks")

    assert code == 0, stderr
    assert metadata["frames_processed"] == 30
    assert metadata["timestamp_discontinuities"] == 2
    assert metadata["frames_expected"] is None, "the container's 1 s duration does not hold for 3 s of video"
    times = metadata["sampled_timestamps"]
    assert np.allclose(np.diff(times), 0.1), "video time runs on across each restart"
    assert ffprobe_stream(output_video(out, video))["nb_read_frames"] == 30
    assert "timestamps restart or jump 2 times" in stderr

    samples, report = sampled(video, 1)
    assert [round(sample.timestamp, 3) for sample in samples] == [0.0, 1.0, 2.0]
    assert report.timestamp_discontinuities == 2


def test_a_long_jump_forward_is_a_discontinuity_and_a_short_gap_is_not(tmp_path):
    late = joined_parts(tmp_path, ["160x120"] * 2, offsets=[0, 3600])  # the second part an hour on
    samples, report = sampled(late, 1)
    assert report.timestamp_discontinuities == 1
    assert [round(sample.timestamp, 3) for sample in samples] == [0.0, 1.0]

    gap = tmp_path / "gap"
    gap.mkdir()
    paused = joined_parts(gap, ["160x120"] * 2, offsets=[0, 3])  # two seconds without frames
    samples, report = sampled(paused, 1)
    assert report.timestamp_discontinuities == 0
    after_pause = float(frame_times(paused)[10])  # the second part's first frame
    assert after_pause > 2.5
    assert samples[1].timestamp == pytest.approx(after_pause), "video time runs on through the pause"


def test_frames_that_go_back_in_a_seekable_file_are_dropped_alike_in_every_window(tmp_path, tiny_model_dir, capsys):
    """Two parts that overlap by two frames, remuxed into an MKV: its windows are found by seeking,
    so video time there is the timestamp, and the two frames that go back have no place in it.
    One window or six, the same frames are kept, and the user is told what was dropped."""
    overlapping = joined_parts(tmp_path, ["160x120"] * 2, offsets=[0, 1])  # ffmpeg overlaps them by 2 frames
    video = tmp_path / "remuxed.mkv"
    ffmpeg("-i", overlapping, "-c", "copy", video)
    assert ffprobe_stream(video)["nb_read_frames"] == 20
    assert np.diff(frame_times(video)).min() < 0, "the input's timestamps go back"

    results = {}
    for chunk_frames in ("4", "1000"):
        out = tmp_path / f"out-{chunk_frames}"
        code, stderr, metadata = segment_one(
            capsys, video, out, tiny_model_dir, "--sample-fps", "0", "--chunk-frames", chunk_frames, "--no-tracks"
        )
        assert code == 0, stderr
        assert "2 frames dropped: their timestamps go back" in stderr
        assert metadata["frames_behind"] == 2 and metadata["timestamp_discontinuities"] == 0
        assert metadata["frames_processed"] == metadata["frames_expected"] == 18
        assert ffprobe_stream(output_video(out, video))["nb_read_frames"] == 18
        results[chunk_frames] = (metadata["sampled_timestamps"], metadata["chunking"]["windows"])
    assert results["4"][1] == 6 and results["1000"][1] == 1
    assert results["4"][0] == results["1000"][0] == pytest.approx([k / 10 for k in range(18)])


# ---------------------------------------------------------------------------------------------
# Streams that change size
# ---------------------------------------------------------------------------------------------


def test_a_stream_that_changes_size_is_scaled_to_its_first_size(tmp_path, tiny_model_dir, capsys):
    """320x240 then 480x360, the second part starting a frame before the first one ends."""
    video = joined_parts(tmp_path, ["320x240", "480x360"], offsets=[0, 0.8])
    out = tmp_path / "out"
    code, stderr, metadata = segment_one(capsys, video, out, tiny_model_dir, "--sample-fps", "0")

    assert code == 0, stderr
    assert metadata["frames_processed"] == 20, "no frame lost at the change"
    assert metadata["size_changes"] == 1 and metadata["timestamp_discontinuities"] == 1
    assert (metadata["width"], metadata["height"]) == (320, 240)
    mp4 = ffprobe_stream(output_video(out, video))
    assert (mp4["width"], mp4["height"], mp4["nb_read_frames"]) == (320, 240, 20)
    boxes = [
        obj["box"]
        for line in (out / "joined" / "joined_tracks.jsonl").read_text().splitlines()
        for obj in json.loads(line)["objects"]
    ]
    assert boxes and all(x1 < 320 and y1 < 240 for _, _, x1, y1 in boxes), "masks in the output's pixel grid"

    # The picture after the change is the whole 480x360 frame scaled down, not its top-left corner.
    samples, _ = sampled(video, 0)
    big = decode_rgb(tmp_path / "part1.ts")[5]
    scaled = decode_rgb(tmp_path / "part1.ts", "scale=320:240")[5]
    later = samples[15].rgb.astype(int)
    assert np.abs(later - scaled).mean() < 6
    assert np.abs(later - big[:240, :320]).mean() > 30


def test_a_size_change_to_another_shape_is_letterboxed(tmp_path):
    video = joined_parts(tmp_path, ["320x240", "320x180"], offsets=[0, 1])
    samples, report = sampled(video, 0)
    assert report.size_changes == 1
    later = samples[15].rgb
    assert later.shape == (240, 320, 3)
    assert later[:28].max() == 0 and later[-28:].max() == 0, "black bars above and below"
    assert later[40:200].mean() > 40, "the picture in between"


# ---------------------------------------------------------------------------------------------
# Non-square pixels
# ---------------------------------------------------------------------------------------------


def anamorphic(folder: Path, where: str) -> Path:
    """480x360 stored, 16:9 on screen: 4:3 pixels in the H.264 stream, or in the container only."""
    if where == "codec":
        video = folder / "anamorphic.mp4"
        ffmpeg(*lavfi_clip("480x360", "25", 2), "-vf", "setsar=4/3", "-c:v", "libx264", video)
    else:
        square = folder / "square.mp4"
        ffmpeg(*lavfi_clip("480x360", "25", 2), "-c:v", "libx264", square)
        video = folder / "anamorphic.mkv"
        ffmpeg("-i", square, "-c", "copy", "-aspect", "16:9", video)
    return video


@pytest.mark.parametrize("where", ["codec", "container"])
def test_non_square_pixels_come_out_as_a_player_shows_them(tmp_path, tiny_model_dir, capsys, where):
    video = anamorphic(tmp_path, where)
    assert ffprobe_stream(video)["sample_aspect_ratio"] == "4:3"
    out = tmp_path / "out"
    code, stderr, metadata = segment_one(capsys, video, out, tiny_model_dir)

    assert code == 0, stderr
    assert (metadata["width"], metadata["height"]) == (640, 360)
    assert (metadata["stored_width"], metadata["stored_height"]) == (480, 360)
    assert metadata["sample_aspect_ratio"] == "4:3"
    mp4 = ffprobe_stream(output_video(out, video))
    assert (mp4["width"], mp4["height"]) == (640, 360)
    assert mp4.get("sample_aspect_ratio", "1:1") in ("1:1", "0:1"), "square pixels: 16:9 on screen"
    preview = av.open(str(out / video.stem / f"{video.stem}_preview.jpg"))
    sheet = next(preview.decode(video=0))
    assert sheet.width / sheet.height == pytest.approx(3 * 16 / (2 * 9), rel=0.01), "tiles at 16:9"
    first = json.loads((out / video.stem / f"{video.stem}_tracks.jsonl").read_text().splitlines()[0])
    assert all(obj["mask"]["size"] == [360, 640] for obj in first["objects"])

    samples, _ = sampled(video, 1)
    reference = decode_rgb(video, "scale=640:360")[0]
    assert np.abs(samples[0].rgb.astype(int) - reference).mean() < 6, "the frame a player shows"


# ---------------------------------------------------------------------------------------------
# --sample-fps: the rate used is the rate recorded
# ---------------------------------------------------------------------------------------------


def test_a_fractional_sample_rate_is_used_and_recorded_exactly(tmp_path, tiny_model_dir, capsys):
    video = tmp_path / "ten.mp4"
    ffmpeg(*lavfi_clip("160x120", "25", 10), "-c:v", "libx264", video)
    out = tmp_path / "out"
    code, stderr, metadata = segment_one(capsys, video, out, tiny_model_dir, "--sample-fps", "1/3", "--no-tracks")

    assert code == 0, stderr
    assert metadata["sample_fps"] == metadata["output_fps"] == pytest.approx(1 / 3, abs=1e-12)
    assert metadata["sampled_timestamps"] == pytest.approx([0, 3, 6, 9])
    mp4 = ffprobe_stream(output_video(out, video))
    assert mp4["avg_frame_rate"] == Fraction(1, 3) and mp4["nb_read_frames"] == 4
    assert mp4["duration"] == pytest.approx(12.0, abs=0.01), "each sample plays for its 3 s"


# ---------------------------------------------------------------------------------------------
# Redoing a video, a failed metadata write, leftovers of killed runs
# ---------------------------------------------------------------------------------------------


def test_overwrite_of_a_video_that_became_unreadable_removes_its_complete_metadata(tmp_path, tiny_model_dir, capsys):
    video = tmp_path / "match.mp4"
    ffmpeg(*lavfi_clip("160x120", "25", 2), "-c:v", "libx264", video)
    out = tmp_path / "out"
    code, stderr, metadata = segment_one(capsys, video, out, tiny_model_dir)
    assert code == 0 and metadata["status"] == "complete", stderr

    video.write_bytes(b"not a video any more")
    code, stderr, metadata = segment_one(capsys, video, out, tiny_model_dir, "--overwrite")
    assert code == 1
    assert metadata == {}, "the old complete metadata must not survive a failed redo"
    assert len(failure_lines(stderr)) == 1 and "not a readable video" in failure_lines(stderr)[0]

    code, _ = run_cli(["--summarize", out], capsys)
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["failed"] == 1 and summary["counts"]["done"] == 0

    code, stderr, _ = segment_one(capsys, video, out, tiny_model_dir)
    assert code == 1 and "skip" not in stderr, "a later run tries it again"


def test_a_failed_metadata_write_fails_that_video_alone(tmp_path, tiny_model_dir, capsys, monkeypatch):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a", "b"):
        ffmpeg(*lavfi_clip("160x120", "25", 1), "-c:v", "libx264", videos / f"{name}.mp4")
    real_write_json = sam3_pipeline.assembly.write_json

    def disk_full_for_a(path: Path, data: dict) -> None:
        if path.name == "a_metadata.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write_json(path, data)

    monkeypatch.setattr(sam3_pipeline.assembly, "write_json", disk_full_for_a)
    out = tmp_path / "out"
    code, stderr = run_cli(segment([videos], out, tiny_model_dir), capsys)

    assert code == 1
    assert "Traceback" not in stderr
    [line] = failure_lines(stderr)
    assert "a.mp4" in line and "No space left on device" in line
    assert not (out / "a" / "a_metadata.json").exists()
    assert json.loads((out / "a" / "a_error.json").read_text())["status"] == "failed"
    assert json.loads((out / "b" / "b_metadata.json").read_text())["status"] == "complete"


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_leftovers_of_killed_runs_are_removed_at_start(tmp_path, tiny_model_dir, capsys, monkeypatch):
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    dead = scratch_root / f"sam3-{dead_pid()}-k1ll3d"
    alive = scratch_root / f"sam3-{os.getpid()}-running"
    unrelated = scratch_root / "sam3-notes"
    for folder in (dead, alive, unrelated):
        folder.mkdir()
        (folder / "match_segmented.mp4").write_bytes(b"\0" * 1000)

    video = tmp_path / "match.mp4"
    ffmpeg(*lavfi_clip("160x120", "25", 1), "-c:v", "libx264", video)
    out = tmp_path / "out"
    (out / "match").mkdir(parents=True)
    long_ago = time.time() - STALE_PARTIAL_SECONDS - 60
    stale = [partial_path(out / "match" / "match_segmented.mp4"), partial_path(out / "summary.json")]
    fresh = partial_path(out / "match" / "match_preview.jpg")  # another job writing it right now
    for partial in (*stale, fresh):
        partial.write_bytes(b"half")
    for partial in stale:
        os.utime(partial, (long_ago, long_ago))

    code, stderr, metadata = segment_one(capsys, video, out, tiny_model_dir)

    assert code == 0 and metadata["status"] == "complete", stderr
    assert not dead.exists() and alive.exists() and unrelated.exists()
    assert not any(partial.exists() for partial in stale) and fresh.exists()
    assert "removed 3 leftovers of killed runs" in stderr
    remaining = sorted(path.name for path in scratch_root.iterdir())
    assert remaining == sorted([alive.name, unrelated.name]), "and this run's own scratch folder is gone"
