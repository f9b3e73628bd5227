"""process_segmentation.py on inputs made by Debian's ffmpeg: encoders, containers and quirks
that nobody here wrote (see /work/shared/notes/real-world-inputs.md).

Each input goes through `main()` with the tiny SAM3 at the default 1 sample per second and is
checked as a user would: the run exits 0 with "complete" metadata, the frame nearest each second
of video time was processed and none was invented in a gap (found from the frame times ffprobe
lists, not from our decoder), and the overlay MP4 is H.264 yuv420p at the size the video is displayed at (cropped to even), with that
many frames.
"""

from __future__ import annotations

import json
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

import process_segmentation as ps
from conftest import sampled_times
from ffmpeg_tools import FFMPEG, FFPROBE, QUIET, ffmpeg, ffprobe_stream, frame_times, require_ffmpeg

require_ffmpeg()

CLIP = ["-f", "lavfi", "-i", "testsrc2=size=320x180:rate=25:duration=3"]
TONE = ["-f", "lavfi", "-i", "sine=frequency=440:duration=3"]

# name -> (file name, ffmpeg arguments between the common options and the output file)
ENCODES: dict[str, tuple[str, list[str]]] = {
    "hevc-10bit-mp4": (
        "hevc10.mp4",
        [*CLIP, "-c:v", "libx265", "-preset", "ultrafast", "-x265-params", "log-level=error"]
        + ["-pix_fmt", "yuv420p10le"],
    ),
    "vp9-webm": ("vp9.webm", [*CLIP, "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8"]),
    "av1-mkv": ("av1.mkv", [*CLIP, "-c:v", "libsvtav1", "-preset", "12"]),
    # Interlaced, and the stream starts at 11.4 s (10 s offset + the muxer's default 1.4 s delay).
    "mpeg2-interlaced-ts-at-10s": (
        "mpeg2.ts",
        [*CLIP, "-c:v", "mpeg2video", "-flags", "+ilme+ildct", "-top", "1"]
        + ["-output_ts_offset", "10", "-f", "mpegts"],
    ),
    "prores-mov": ("prores.mov", [*CLIP, "-c:v", "prores"]),
    "mjpeg-avi": ("mjpeg.avi", [*CLIP, "-c:v", "mjpeg"]),
    "4k-60fps-h264": (
        "uhd60.mp4",
        ["-f", "lavfi", "-i", "testsrc2=size=3840x2160:rate=60:duration=2"]
        + ["-c:v", "libx264", "-preset", "ultrafast"],
    ),
    # 10 fps for 1 s (0-0.9 s), nothing from 1.0 to 2.5 s, then 30 fps for 1 s: second 1 holds no frame.
    "vfr-10fps-gap-30fps": (
        "vfr.mp4",
        ["-f", "lavfi", "-i", "testsrc2=size=320x180:rate=10:duration=1"]
        + ["-f", "lavfi", "-i", "testsrc2=size=320x180:rate=30:duration=1"]
        + ["-filter_complex", "[1:v]setpts=PTS+1.5/TB[late];[0:v][late]concat=n=2:v=1[v]", "-map", "[v]"]
        + ["-vsync", "vfr", "-c:v", "libx264"],
    ),
    "mkv-audio-stream-first": (
        "audio_first.mkv",
        [*TONE, *CLIP, "-map", "0:a", "-map", "1:v", "-c:a", "aac", "-c:v", "libx264"],
    ),
    "odd-161x91-yuv444p": (
        "odd.mp4",
        [*CLIP, "-vf", "scale=161:91", "-pix_fmt", "yuv444p", "-c:v", "libx264"],
    ),
    "h264-bframes-aac": (
        "bframes.mp4",
        ["-f", "lavfi", "-i", "testsrc2=size=320x180:rate=30:duration=3", *TONE]
        + ["-c:v", "libx264", "-bf", "3", "-c:a", "aac"],
    ),
}


def make_phone_clip(folder: Path) -> Path:
    """A landscape encode (testsrc2 is not symmetric) given a 90-degree display matrix, as phones
    write them. ffmpeg 5.1 honours the `rotate` tag only when stream-copying."""
    landscape = folder / "landscape.mp4"
    ffmpeg(*CLIP, "-c:v", "libx264", landscape)
    phone = folder / "phone.mp4"
    ffmpeg("-i", landscape, "-c", "copy", "-metadata:s:v:0", "rotate=90", phone)
    return phone


def make_cut_faststart(folder: Path) -> tuple[Path, Path]:
    """(whole, cut): a 10 s faststart MP4 and its first half, as an interrupted download leaves
    it. The index (moov) still describes all 10 s; about the first 5 s of frames are there."""
    whole = folder / "whole.mp4"
    ffmpeg(
        "-f", "lavfi", "-i", "testsrc2=size=320x180:rate=25:duration=10", "-c:v", "libx264",
        "-movflags", "+faststart", whole,
    )  # fmt: skip
    cut = folder / "cut.mp4"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    return whole, cut


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every input, made once for this module: {case name: path}."""
    folder = tmp_path_factory.mktemp("real-world")
    made = {}
    for name, (file_name, args) in ENCODES.items():
        ffmpeg(*args, folder / file_name)
        made[name] = folder / file_name
    made["phone"] = make_phone_clip(folder)
    made["cut-whole"], made["cut"] = make_cut_faststart(folder)
    return made


# ---------------------------------------------------------------------------------------------
# What ffprobe says (independent of the script's own decoding)
# ---------------------------------------------------------------------------------------------


def expected_samples(video: Path) -> list[float]:
    """The times (from the first frame) of the frames a 1 fps sampler must take (`sampled_times`),
    from the frame times ffprobe lists and its average frame rate."""
    average_interval = 1 / ffprobe_stream(video)["avg_frame_rate"]
    return sampled_times([float(time) for time in frame_times(video)], float(average_interval))


def displayed_size(video: Path) -> tuple[int, int]:
    """(width, height) as a player shows the video: stored pixels stretched to square by the sample
    aspect ratio (ffmpeg's scaler sets one where it keeps the picture's shape), then a 90/270-degree
    display matrix swaps them."""
    probe = subprocess.run(
        [FFPROBE, "-v", "error", "-select_streams", "v:0", "-of", "json"]
        + ["-show_entries", "stream=width,height,sample_aspect_ratio:stream_side_data=rotation", str(video)],
        capture_output=True,
        text=True,
        check=True,
    )
    stream = json.loads(probe.stdout)["streams"][0]
    rotation = next((int(d["rotation"]) for d in stream.get("side_data_list", []) if "rotation" in d), 0)
    ratio = Fraction(stream.get("sample_aspect_ratio", "1:1").replace(":", "/")) or 1
    size = (round(stream["width"] * ratio), stream["height"])
    return size[::-1] if rotation % 180 else size


# ---------------------------------------------------------------------------------------------
# Running the script and checking what a user gets
# ---------------------------------------------------------------------------------------------


def run_one(
    video: Path, output_dir: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """main() on one video with the tiny model at the default 1 fps; (exit code, stderr)."""
    code = ps.main(
        [str(video), "--output-dir", str(output_dir), "--model", str(model_dir), "--device", "cpu"]
    )
    return code, capsys.readouterr().err


def check_complete_run(
    video: Path, output_dir: Path, code: int, stderr: str, expected_times: list[float]
) -> tuple[dict, list[np.ndarray]]:
    """The checks every input must pass; returns (metadata, the output MP4's frames as RGB)."""
    assert code == 0, stderr
    folder = output_dir / video.stem
    assert not (folder / f"{video.stem}_error.json").exists()
    metadata = json.loads((folder / f"{video.stem}_metadata.json").read_text())
    assert metadata["status"] == "complete"
    sampled = metadata["sampled_timestamps"]
    assert sampled == pytest.approx(expected_times, abs=1e-3), "the frame nearest each second of video time"
    assert metadata["frames_processed"] == len(expected_times)
    width, height = displayed_size(video)
    assert (metadata["width"], metadata["height"]) == (width, height), "metadata gives the displayed size"

    with av.open(str(folder / f"{video.stem}_segmented.mp4")) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        even_size = (width - width % 2, height - height % 2)
        assert (stream.width, stream.height) == even_size, "output MP4 at the displayed size, cropped to even"
    assert len(frames) == len(expected_times)
    return metadata, frames


@pytest.mark.slow
@pytest.mark.parametrize("case", list(ENCODES), ids=list(ENCODES))
def test_real_world_input_completes_one_frame_per_second(case, inputs, tiny_model_dir, tmp_path, capsys):
    video = inputs[case]
    code, stderr = run_one(video, tmp_path, tiny_model_dir, capsys)
    metadata, _ = check_complete_run(video, tmp_path, code, stderr, expected_samples(video))
    assert metadata.get("rotation", 0) == 0


def orientation_scores(frame: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Correlation of `frame` with the upright reference and with the other pictures of the same
    shape that a wrong rotation gives (turned the wrong way = turned 180 degrees; transposed
    without the flip = mirrored).

    Why not pixel differences: the overlay blends each mask 50/50 with a flat colour (the tiny
    model's masks cover most of the frame) and draws outlines and labels. Inside a mask the
    picture survives at half contrast, which a correlation ignores. Each picture is reduced to
    grey 8x8-block means (blurring away outlines, label text and codec noise), then its row and
    column means are removed: testsrc2's full-width colour bars look the same mirrored, and
    would otherwise dominate; what is left (the slanted stripe, the clock, the noise squares)
    tells every orientation apart. Measured: upright 0.80-0.87, the others -0.34 to -0.03.
    """

    def features(rgb: np.ndarray) -> np.ndarray:
        grey = rgb.astype(np.float64).mean(axis=2)
        h, w = grey.shape[0] // 8 * 8, grey.shape[1] // 8 * 8
        blocks = grey[:h, :w].reshape(h // 8, 8, w // 8, 8).mean(axis=(1, 3))
        blocks -= blocks.mean(axis=1, keepdims=True)
        blocks -= blocks.mean(axis=0, keepdims=True)
        return blocks.ravel()

    candidates = {
        "upright": reference,
        "turned 180": reference[::-1, ::-1],
        "mirrored left-right": reference[:, ::-1],
        "mirrored top-bottom": reference[::-1, :],
    }
    crop = (slice(0, frame.shape[0]), slice(0, frame.shape[1]))  # the output is cropped to even
    return {
        name: float(np.corrcoef(features(frame), features(candidate[crop]))[0, 1])
        for name, candidate in candidates.items()
    }


def test_phone_clip_is_processed_upright(inputs, tiny_model_dir, tmp_path, capsys):
    phone = inputs["phone"]
    code, stderr = run_one(phone, tmp_path, tiny_model_dir, capsys)
    metadata, frames = check_complete_run(phone, tmp_path, code, stderr, expected_samples(phone))
    assert (metadata["width"], metadata["height"]) == (180, 320)
    assert metadata["rotation"] == 90  # as PyAV's frame.rotation reports it (ffprobe: rotation=90)

    # ffmpeg's own CLI rotates by default: its first frame is the picture as players show it.
    raw = subprocess.run(
        [FFMPEG, *QUIET, "-i", str(phone), "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True,
        check=True,
    ).stdout
    reference = np.frombuffer(raw, np.uint8).reshape(320, 180, 3)
    scores = orientation_scores(frames[0], reference)
    wrong = max(score for name, score in scores.items() if name != "upright")
    assert scores["upright"] > 0.6 and scores["upright"] - wrong > 0.3, scores


def test_cut_faststart_mp4_keeps_the_part_that_decodes(inputs, tiny_model_dir, tmp_path, capsys):
    cut = inputs["cut"]
    decodable = expected_samples(cut)
    assert 3 <= len(decodable) <= 7, f"the cut should leave about half of the 10 s: {decodable}"
    code, stderr = run_one(cut, tmp_path, tiny_model_dir, capsys)
    metadata, _ = check_complete_run(cut, tmp_path, code, stderr, decodable)
    # what the index promised: the whole 10 s at 1 fps
    assert metadata["frames_expected"] == len(expected_samples(inputs["cut-whole"])) == 10
    error = metadata["decode_error"]
    assert isinstance(error, str) and error.strip() and "\n" not in error
