"""process_segmentation.py end to end with a tiny random SAM3, plus its stages on their own."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import make_tiny_sam3
import process_segmentation as ps
from sam3_pipeline.outputs import output_problems
from sam3_pipeline.overlay import PALETTE, draw_overlay, layout_labels, object_color
from sam3_pipeline.sam3 import Detections, Segmenter, detections_from, match_objects, session_output
from sam3_pipeline.video_io import H264Writer, output_rate, sample_frames
from conftest import REPO, failure_lines, pitch_frame, run_cli, sampled_times, segment, write_test_video

PROMPTS = ["soccer player", "ball"]


def decode(path: Path) -> tuple[av.video.stream.VideoStream, list[np.ndarray]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return stream, frames


# ---------------------------------------------------------------------------------------------
# Sampling by presentation time
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fps", "sample_fps", "seconds"),
    [("30000/1001", 1.0, 6.0), (25, 2.0, 3.0), ("30000/1001", 3.0, 2.0)],
    ids=["29.97fps-at-1", "25fps-at-2", "29.97fps-at-3"],
)
def test_sample_frames_one_sample_per_interval_without_drift(tmp_path, fps, sample_fps, seconds):
    video = write_test_video(tmp_path / "clip.mp4", seconds=seconds, fps=fps)
    with av.open(str(video)) as container:
        samples = list(sample_frames(container, sample_fps, max_frames=0))
    frame_time = 1 / float(Fraction(fps))
    assert len(samples) == round(seconds * sample_fps)
    for k, sample in enumerate(samples):
        assert -frame_time / 2 < sample.timestamp - k / sample_fps <= frame_time / 2 + 1e-9  # nearest, ties later
        assert sample.rgb.shape == (96, 160, 3) and sample.rgb.dtype == np.uint8


def test_sample_frames_variable_frame_rate_follows_video_time(tmp_path):
    gaps = np.random.default_rng(7).choice([0.02, 0.033, 0.06, 0.1, 0.25], size=120)
    times = np.concatenate([[0.0], np.cumsum(gaps)])
    video = write_test_video(tmp_path / "vfr.mp4", frame_times=times)
    with av.open(str(video)) as container:
        average_interval = 1 / container.streams.video[0].average_rate
        samples = list(sample_frames(container, 1.0, max_frames=0))
    expected = sampled_times(np.round(times, 3), float(average_interval))  # stored in milliseconds
    assert len(expected) >= int(times[-1]), "about one per second"
    assert [sample.timestamp for sample in samples] == pytest.approx(expected, abs=1e-3)


def test_sample_frames_above_source_rate_yields_every_frame(tmp_path):
    video = write_test_video(tmp_path / "clip.mp4", seconds=1.0, fps=25)
    with av.open(str(video)) as container:
        samples = list(sample_frames(container, 100.0, max_frames=0))
    assert [sample.source_index for sample in samples] == list(range(25))
    assert output_rate(100.0, Fraction(25)) == 25
    assert output_rate(0, Fraction(30000, 1001)) == Fraction(30000, 1001)


def test_sample_frames_max_frames_stops_early(tmp_path):
    video = write_test_video(tmp_path / "clip.mp4", seconds=4.0, fps=25)
    with av.open(str(video)) as container:
        assert len(list(sample_frames(container, 0, max_frames=7))) == 7


# ---------------------------------------------------------------------------------------------
# Overlay
# ---------------------------------------------------------------------------------------------


def detections_from_full_masks(object_ids, prompts, masks: np.ndarray) -> Detections:
    """Detections from (N, H, W) bool masks, cropped the way the pipeline stores them."""
    boxes, crops = [], []
    for mask in masks:
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        boxes.append([cols[0], rows[0], cols[-1], rows[-1]])
        crops.append(mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    return Detections(
        np.array(object_ids), list(prompts), np.full(len(masks), 0.9, np.float32), np.array(boxes), crops
    )


def test_draw_overlay_tints_masked_pixels_only_and_colours_follow_ids():
    frame = pitch_frame(0, 320, 180)
    masks = np.zeros((2, 180, 320), dtype=bool)
    masks[0, 100:160, 20:200] = True  # large object
    masks[0, 100:110, 20:40] = False  # with a notch: the box is not all mask
    masks[1, 120:130, 60:70] = True  # small object on top of it
    out = draw_overlay(frame, detections_from_full_masks([3, 7], PROMPTS, masks))

    assert out.shape == frame.shape and out.dtype == np.uint8
    changed = np.any(out != frame, axis=2)
    assert changed[masks[0] | masks[1]].mean() > 0.95
    assert not changed[102:108, 24:36].any(), "the notch is inside the box but not in the mask"
    outside_boxes = np.ones((180, 320), dtype=bool)
    outside_boxes[80:162, 18:202] = False  # boxes, their outlines and the label above them
    assert not changed[outside_boxes].any()
    # the small object is painted last, over the large one, so its own colour stays visible
    under_large = 0.5 * frame[125, 65] + 0.5 * np.array(object_color(3))
    expected = 0.5 * under_large + 0.5 * np.array(object_color(7))
    assert np.abs(out[125, 65].astype(float) - expected).max() <= 2
    assert object_color(3) != object_color(7) and object_color(3) == object_color(
        3 + len(PALETTE)
    )


def corner_kick(count: int = 15, size: tuple[int, int] = (720, 1280)) -> Detections:
    """`count` players crowded into one box of the frame's top-left corner, boxes overlapping."""
    masks = np.zeros((count, *size), dtype=bool)
    for i in range(count):
        x0, y0 = 20 + 9 * (i % 5), 30 + 14 * (i // 5)
        masks[i, y0 : y0 + 90, x0 : x0 + 40] = True
    return detections_from_full_masks(list(range(1, count + 1)), ["soccer player"] * count, masks)


@pytest.mark.parametrize("size", [(480, 854), (720, 1280), (1080, 1920)], ids=["480p", "720p", "1080p"])
def test_crowded_labels_each_stand_apart_from_the_others(size):
    detections = corner_kick(size=size)
    labels = layout_labels(detections, size)

    assert [label.text for label in labels] == ["soccer player"] * 15
    for label in labels:
        assert 0 <= label.x and label.x + label.width <= size[1] and 0 <= label.y and label.y + label.height <= size[0]
    for a, b in itertools.combinations(labels, 2):
        apart = a.x + a.width <= b.x or b.x + b.width <= a.x or a.y + a.height <= b.y or b.y + b.height <= a.y
        assert apart, f"{a.text!r} and {b.text!r} overlap"
    drawn = draw_overlay(pitch_frame(0, size[1], size[0]), detections)
    for obj_id, label in zip(detections.object_ids, labels):
        # labels are drawn last: each one's corner shows its object's colour, on top of everything
        assert tuple(drawn[label.y, label.x]) == object_color(int(obj_id))


# ---------------------------------------------------------------------------------------------
# Masks: our box-local post-processing against transformers' own
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crowd_segmenter(tmp_path_factory) -> Segmenter:
    """The tiny SAM3 tracking 20 objects (10 queries per prompt), as in the benchmark."""
    directory = make_tiny_sam3.save_tiny_sam3(
        tmp_path_factory.mktemp("crowd"), num_prompts=2, objects_per_prompt=10
    )
    return ps.load_segmenter(str(directory), torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("size", [(180, 320), (97, 161)], ids=["320x180", "odd-161x97"])
def test_masks_match_transformers_postprocess_outputs(crowd_segmenter, size):
    height, width = size
    processor, model = crowd_segmenter.processor, crowd_segmenter.model
    session = processor.init_video_session(inference_device="cpu", dtype=torch.float32)
    processor.add_text_prompt(session, PROMPTS)
    objects_compared = 0
    with torch.inference_mode():
        for frame_idx in range(4):
            pixels = processor.video_processor(
                videos=[pitch_frame(frame_idx, width, height)], return_tensors="pt"
            )
            session.add_new_frame(pixels.pixel_values_videos[0], frame_idx=frame_idx)
            output = model(inference_session=session, frame_idx=frame_idx)
            reference = processor.postprocess_outputs(session, output, original_sizes=[[height, width]])
            ours = detections_from(session_output(output, session), size)

            expected = {
                int(i): m.numpy() for i, m in zip(reference["object_ids"], reference["masks"]) if m.any()
            }
            assert sorted(expected) == sorted(map(int, ours.object_ids))
            for index, obj_id in enumerate(map(int, ours.object_ids)):
                mine = ours.full_mask(index, size)
                iou = np.count_nonzero(mine & expected[obj_id]) / np.count_nonzero(mine | expected[obj_id])
                assert iou >= 0.98, (frame_idx, obj_id, iou)
                x0, y0, x1, y1 = ours.boxes[index]
                rows, cols = np.flatnonzero(mine.any(axis=1)), np.flatnonzero(mine.any(axis=0))
                assert (x0, y0, x1, y1) == (cols[0], rows[0], cols[-1], rows[-1]), (
                    "box must be the mask's tight box"
                )
                objects_compared += 1
    assert objects_compared >= 8, "the tiny model should give several non-empty masks to compare"


# ---------------------------------------------------------------------------------------------
# End to end with the tiny model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_720p(tmp_path_factory) -> Path:
    return write_test_video(
        tmp_path_factory.mktemp("videos") / "match_720p.mp4", seconds=3.0, fps=25, size=(1280, 720)
    )


def test_end_to_end_720p_writes_playable_h264_and_metadata(tmp_path, tiny_model_dir, clip_720p, capsys):
    code, stderr = run_cli(segment([clip_720p], tmp_path, tiny_model_dir, "--sample-fps", "2"), capsys)
    assert code == 0, stderr

    mp4 = tmp_path / "match_720p" / "match_720p_segmented.mp4"
    stream, frames = decode(mp4)
    assert len(frames) == 6
    assert stream.average_rate == 2
    assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
    assert (stream.width, stream.height) == (1280, 720)
    data = mp4.read_bytes()
    assert 0 <= data.find(b"moov") < data.find(b"mdat"), "moov atom must come first (faststart)"
    # The tiny model's masks cover most of the frame: the overlay must show them.
    with av.open(str(clip_720p)) as container:
        sources = [s.rgb for s in sample_frames(container, 2.0, 0)]
    for source, drawn in zip(sources, frames):
        assert np.abs(source.astype(int) - drawn.astype(int)).mean() > 10

    metadata = json.loads((tmp_path / "match_720p" / "match_720p_metadata.json").read_text())
    assert metadata["status"] == "complete"
    assert metadata["video_name"] == "match_720p.mp4" and metadata["source_path"] == str(clip_720p)
    assert metadata["frames_processed"] == 6
    assert metadata["original_fps"] == 25 and metadata["output_fps"] == 2
    assert metadata["sampled_timestamps"] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5], abs=0.04)
    assert metadata["sampled_frame_indices"] == [0, 13, 25, 38, 50, 63]
    assert metadata["prompts"] == PROMPTS
    assert metadata["objects_detected"] == 2
    assert metadata["objects_per_prompt"] == {"soccer player": 1, "ball": 1}
    for obj in metadata["objects"]:
        assert obj["first_frame"] == 0 and obj["last_frame"] == 5 and obj["frames_present"] == 6
        assert obj["prompt"] in PROMPTS and 0 < obj["score"] <= 1
    assert {obj["prompt"] for obj in metadata["objects"]} == set(PROMPTS)
    assert metadata["model"] == str(tiny_model_dir)
    assert (metadata["device"], metadata["dtype"]) == ("cpu", "float32")
    assert metadata["frames_per_second"] > 0 and metadata["processing_seconds"] > 0
    assert metadata["output_video"] == str(mp4)
    assert not (tmp_path / "match_720p" / "match_720p_error.json").exists()
    assert "done match_720p.mp4: 6 frames, 2 objects" in stderr


def test_odd_sized_video_is_cropped_to_even_and_every_frame_kept(tmp_path, tiny_model_dir, capsys):
    # H.264 in yuv420p cannot have odd sizes; lossless FFV1 in Matroska can.
    video = write_test_video(
        tmp_path / "odd.mkv", seconds=1.0, fps=10, size=(161, 97), codec="ffv1", pix_fmt="yuv444p"
    )
    code, stderr = run_cli(segment([video], tmp_path / "out", tiny_model_dir, "--sample-fps", "0"), capsys)
    assert code == 0, stderr
    stream, frames = decode(tmp_path / "out" / "odd" / "odd_segmented.mp4")
    assert (stream.width, stream.height) == (160, 96) and len(frames) == 10 and stream.average_rate == 10


def test_folder_and_files_share_one_model_load_and_rerun_skips(tmp_path, tiny_model_dir, monkeypatch, capsys):
    videos = tmp_path / "videos"
    (videos / "half2").mkdir(parents=True)
    for name in ["b.mp4", "half2/a.mov"]:
        write_test_video(videos / name, seconds=2.0)
    extra = write_test_video(tmp_path / "c.mp4", seconds=1.0)
    (videos / "notes.txt").write_text("not a video, not picked up")
    loads = []
    real_load = ps.load_segmenter
    monkeypatch.setattr(ps, "load_segmenter", lambda *a: loads.append(a) or real_load(*a))
    out = tmp_path / "out"

    code, stderr = run_cli(segment([videos, extra], out, tiny_model_dir), capsys)
    assert code == 0, stderr
    assert len(loads) == 1
    # keyed by their path inside the folder given: half2/a.mov -> out/half2/a/a_segmented.mp4
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*_segmented.mp4")) == [
        "b/b_segmented.mp4",
        "c/c_segmented.mp4",
        "half2/a/a_segmented.mp4",
    ]
    assert stderr.index("1/3 - " + str(videos / "b.mp4")) < stderr.index(
        "2/3 - " + str(videos / "half2" / "a.mov")
    )
    outputs = sorted(out.rglob("*_segmented.mp4")) + sorted(out.rglob("*_metadata.json"))
    stamps = {path: path.stat().st_mtime_ns for path in outputs}

    code, stderr = run_cli(segment([videos, extra], out, tiny_model_dir), capsys)
    assert code == 0 and len(loads) == 1, "a complete rerun must not even load the model"
    assert stderr.count("skip ") == 3
    assert {path: path.stat().st_mtime_ns for path in outputs} == stamps

    code, stderr = run_cli(segment([extra], out, tiny_model_dir, "--overwrite"), capsys)
    assert code == 0 and len(loads) == 2
    assert (out / "c" / "c_segmented.mp4").stat().st_mtime_ns != stamps[out / "c" / "c_segmented.mp4"]
    assert (out / "b" / "b_segmented.mp4").stat().st_mtime_ns == stamps[out / "b" / "b_segmented.mp4"]


def test_chunked_run_keeps_ids_across_windows_and_every_frame(tmp_path, tiny_model_dir, capsys):
    video = write_test_video(tmp_path / "long.mp4", seconds=2.0, fps=10)
    runs = {}
    for name, chunk in [("whole", "1000"), ("chunked", "8")]:
        out = tmp_path / name
        code, stderr = run_cli(
            segment([video], out, tiny_model_dir, "--sample-fps", "0", "--chunk-frames", chunk), capsys
        )
        assert code == 0, stderr
        runs[name] = json.loads((out / "long" / "long_metadata.json").read_text())
        _, frames = decode(out / "long" / "long_segmented.mp4")
        assert len(frames) == 20

    chunked, whole = runs["chunked"], runs["whole"]
    # frames 0-7, then 8-14 and 15-19 (each session also fed the frame before, to match IDs on)
    assert chunked["chunking"] == {"chunk_frames": 8, "windows": 3, "frames_per_window": [8, 7, 5]}
    assert whole["chunking"]["windows"] == 1
    assert chunked["frames_processed"] == whole["frames_processed"] == 20
    assert chunked["sampled_frame_indices"] == whole["sampled_frame_indices"] == list(range(20))
    # one object per prompt stays in view throughout: same IDs, present on every frame
    assert chunked["objects_detected"] == 2
    for obj in chunked["objects"]:
        assert (obj["first_frame"], obj["last_frame"], obj["frames_present"]) == (0, 19, 20), obj
    assert {o["id"]: o["prompt"] for o in chunked["objects"]} == {
        o["id"]: o["prompt"] for o in whole["objects"]
    }


def test_match_objects_pairs_by_mask_overlap_within_a_prompt():
    size = (60, 100)
    masks = np.zeros((3, *size), dtype=bool)
    masks[0, 5:30, 5:30] = True  # player, moved a little in `current`
    masks[1, 35:55, 60:95] = True  # another player
    masks[2, 40:45, 10:15] = True  # ball
    previous = detections_from_full_masks([4, 9, 11], ["player", "player", "ball"], masks)
    moved = masks.copy()
    moved[0] = np.roll(masks[0], 2, axis=1)
    current = detections_from_full_masks(
        [0, 1, 2, 3], ["player", "ball", "player", "ball"], np.stack([moved[1], moved[2], moved[0], masks[0]])
    )
    # local 3 ("ball") overlaps the first player perfectly but has another prompt: no match
    assert match_objects(previous, current) == {0: 9, 1: 11, 2: 4}


def write_not_a_video(path: Path) -> Path:
    path.write_text("this is a text file with a video name\n")
    return path


def write_audio_only(path: Path) -> Path:
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def write_no_frames(path: Path) -> Path:
    """A faststart MP4 cut right after its header: a video stream, but no frame to decode."""
    write_test_video(path.with_suffix(".full.mp4"), seconds=1.0)
    with (
        av.open(str(path.with_suffix(".full.mp4"))) as source,
        av.open(str(path), "w", options={"movflags": "+faststart"}) as target,
    ):
        out_stream = target.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = out_stream
                target.mux(packet)
    path.with_suffix(".full.mp4").unlink()
    data = path.read_bytes()
    path.write_bytes(data[: data.find(b"mdat") + 4])
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make_bad", "problem"),
    [
        (lambda d: d / "missing.mp4", "no such file"),
        (lambda d: write_not_a_video(d / "notes.mp4"), "not a readable video"),
        (lambda d: write_audio_only(d / "commentary.mp4"), "no video stream"),
        (lambda d: write_no_frames(d / "empty.mp4"), "no frames could be decoded"),
    ],
    ids=["missing", "not-a-video", "audio-only", "no-frames"],
)
def test_bad_video_fails_alone_with_one_line_and_error_record(
    tmp_path, tiny_model_dir, capsys, make_bad, problem
):
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = write_test_video(inputs / "good.mp4", seconds=1.0)
    bad = make_bad(inputs)
    code, stderr = run_cli(segment([bad, good], tmp_path / "out", tiny_model_dir), capsys)

    assert code == 1
    assert "Traceback" not in stderr
    failures = failure_lines(stderr)
    assert failures == [f"FAILED {bad}: {problem}"] or (
        len(failures) == 1 and failures[0].startswith(f"FAILED {bad}: {problem}")
    )
    assert json.loads((tmp_path / "out" / "good" / "good_metadata.json").read_text())["status"] == "complete"
    record = json.loads((tmp_path / "out" / bad.stem / f"{bad.stem}_error.json").read_text())
    assert record["status"] == "failed" and record["source_path"] == str(bad) and problem in record["error"]
    assert "traceback" not in record
    assert not (tmp_path / "out" / bad.stem / f"{bad.stem}_metadata.json").exists()


@pytest.mark.slow
def test_error_record_is_cleared_when_the_video_later_succeeds(tmp_path, tiny_model_dir, capsys):
    video = tmp_path / "later.mp4"
    code, _ = run_cli(segment([video], tmp_path / "out", tiny_model_dir), capsys)
    assert code == 1 and (tmp_path / "out" / "later" / "later_error.json").exists()
    write_test_video(video, seconds=1.0)
    code, _ = run_cli(segment([video], tmp_path / "out", tiny_model_dir), capsys)
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "out" / "later").iterdir()) == [
        "later_metadata.json",
        "later_mot.txt",
        "later_preview.jpg",
        "later_segmented.mp4",
        "later_tracks.jsonl",
        "windows",
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--prompts", "a player wearing a bright red shirt and white socks"],
            "tokens; SAM3's text encoder takes at most 32",
        ),
        (["--output-dir", "{file}/results"], "output folder is not writable"),
        (["--sample-fps", "fast"], "--sample-fps: not a number or fraction: 'fast'"),
        (["--sample-fps", "0.0002"], "--sample-fps must be 0 (every frame) or at least 1/3600 (one frame per hour)"),
        (["--sample-fps", "-1"], "--sample-fps must be 0 (every frame) or at least 1/3600"),
        (["--max-frames", "-1"], "--max-frames must be 0 or more"),
        (["--shard-index", "2", "--num-shards", "2"], "--shard-index must be in [0, --num-shards)"),
        (["--device", "tpu"], "invalid choice: 'tpu'"),
        (["--prompts", "ball", "ball"], "--prompts has duplicates"),
        (["--model", "{dir}/no-such-model"], "no-such-model: no such directory"),
    ],
    ids=[
        "prompt-too-long",
        "unwritable-output",
        "sample-fps-text",
        "sample-fps-below-one-per-hour",
        "sample-fps-negative",
        "negative-max-frames",
        "shard-out-of-range",
        "unknown-device",
        "duplicate-prompts",
        "missing-model-dir",
    ],
)
def test_usage_error_exits_2_with_one_line(tmp_path, tiny_model_dir, capsys, extra, message):
    video = write_test_video(tmp_path / "clip.mp4", seconds=1.0)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    extra = [arg.format(file=blocker, dir=tmp_path) for arg in extra]
    args = [
        str(video),
        "--output-dir",
        str(tmp_path / "out"),
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        *extra,
    ]
    code, stderr = run_cli(args, capsys)

    assert code == 2
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], stderr
    assert not list((tmp_path / "out").glob("*/*_metadata.json")) if (tmp_path / "out").is_dir() else True


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on a machine without a GPU")
@pytest.mark.parametrize(
    ("driver", "expected"),
    [
        ("535.216.01", "NVIDIA driver 535.216.01 is too old"),
        (None, "no NVIDIA driver answers"),
    ],
    ids=["old-driver", "no-driver"],
)
def test_device_cuda_without_gpu_fails_before_any_video(
    tmp_path, tiny_model_dir, capsys, monkeypatch, driver, expected
):
    """What a worker whose PyTorch cannot see the GPU prints: one line naming CUDA, the driver
    and PyTorch's CUDA version, and no video is touched."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if driver:
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho {driver}\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    video = write_test_video(tmp_path / "clip.mp4", seconds=1.0)
    code, stderr = run_cli(
        [video, "--output-dir", tmp_path / "out", "--model", tiny_model_dir, "--device", "cuda"], capsys
    )
    assert code == 2
    [line] = failure_lines(stderr)
    assert line.startswith("error: --device cuda: PyTorch") and expected in line, line
    assert f"CUDA {torch.version.cuda}" in line, line
    assert not (tmp_path / "out").exists(), "no video may be started"

    code, stderr = run_cli(["--check-device", "--device", "cuda"], capsys)
    assert code == 2 and failure_lines(stderr) == [line]


def test_check_device_cpu_names_device_and_precision(capsys):
    assert ps.main(["--check-device", "--device", "cpu", "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip() == f"cpu: PyTorch {torch.__version__}, bfloat16"


def test_hf_token_is_never_printed_or_written(tmp_path, tiny_model_dir, capsys, monkeypatch):
    secret = "hf_TESTSECRET0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    good = write_test_video(tmp_path / "good.mp4", seconds=1.0)
    bad = write_not_a_video(tmp_path / "bad.mp4")
    code, stderr = run_cli(segment([good, bad], tmp_path / "out", tiny_model_dir), capsys)
    assert code == 1
    assert secret not in stderr
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_interrupted_run_leaves_no_file_that_looks_complete(tmp_path, tiny_model_dir, capsys):
    video = write_test_video(tmp_path / "long.mp4", seconds=12.0, fps=25, size=(320, 192))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "out"
    env = {**os.environ, "TMPDIR": str(scratch), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "process_segmentation.py"),
            *segment([video], out, tiny_model_dir, "--sample-fps", "0"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # Each progress update wakes this loop, until the encoder has written part of the video.
        while os.read(process.stderr.fileno(), 65536):
            if any(p.stat().st_size > 0 for p in scratch.glob("sam3-*/*.mp4")):
                break
        assert process.poll() is None, "the run finished before it could be interrupted"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
        process.stderr.close()

    names = [p.name for p in out.rglob("*") if p.is_file()]
    finished_looking = ("_segmented.mp4", "_tracks.jsonl", "_mot.txt", "_preview.jpg", "_metadata.json")
    assert not [name for name in names if name.endswith(finished_looking)], names
    code, stderr = run_cli(segment([video], out, tiny_model_dir, "--max-frames", "5"), capsys)
    assert code == 0 and "skip" not in stderr, "an interrupted video must be redone, not skipped"


# ---------------------------------------------------------------------------------------------
# Real-world conditions: files cut short, other precisions
# ---------------------------------------------------------------------------------------------


def write_cut_video(path: Path, seconds: int = 10, fps: int = 25) -> Path:
    """A faststart MP4 (index first, as uploads are) with its second half missing, as an
    interrupted upload or copy leaves it."""
    whole = path.with_name("whole.mp4")
    with H264Writer(whole, 160, 96, Fraction(fps)) as writer:
        for index in range(seconds * fps):
            writer.write(pitch_frame(index, 160, 96))
    data = whole.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_video_cut_short_keeps_what_decoded_and_counts_as_partial(tmp_path, tiny_model_dir, capsys):
    video = write_cut_video(tmp_path / "cut.mp4")
    out = tmp_path / "out"
    code, stderr = run_cli(segment([video], out, tiny_model_dir), capsys)
    assert code == 0, stderr
    metadata = json.loads((out / "cut" / "cut_metadata.json").read_text())
    assert metadata["status"] == "complete" and metadata["frames_expected"] == 10
    assert 3 <= metadata["frames_processed"] <= 6, "about the first half decodes"
    assert metadata["decode_error"] and "\n" not in metadata["decode_error"]
    _, frames = decode(out / "cut" / "cut_segmented.mp4")
    assert len(frames) == metadata["frames_processed"] == len(metadata["sampled_timestamps"])
    tracks = (out / "cut" / "cut_tracks.jsonl").read_text().splitlines()
    assert len(tracks) == metadata["frames_processed"]
    [warning] = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert "cut.mp4" in warning and metadata["decode_error"] in warning

    assert ps.main(["--summarize", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"done": 0, "partial": 1, "failed": 0, "missing": 0}
    assert summary["videos"][0]["decode_error"] == metadata["decode_error"]
    rows = (out / "summary.csv").read_text().splitlines()
    assert "decode_error" in rows[0].split(",") and metadata["decode_error"] in rows[1]
    assert "partial: cut: " in capsys.readouterr().out

    code, stderr = run_cli(segment([video], out, tiny_model_dir), capsys)
    assert code == 0 and "skip" in stderr, "a partial video is complete as far as it decodes"


def test_bfloat16_runs_the_whole_pipeline(tmp_path, tiny_model_dir, capsys):
    """The precision GPUs run in, here on the CPU, so that a dtype mismatch shows in CI."""
    video = write_test_video(tmp_path / "clip.mp4", seconds=3.0)
    code, stderr = run_cli(segment([video], tmp_path, tiny_model_dir, "--dtype", "bfloat16"), capsys)
    assert code == 0, stderr
    metadata = json.loads((tmp_path / "clip" / "clip_metadata.json").read_text())
    assert metadata["dtype"] == "bfloat16" and metadata["frames_processed"] == 3
    assert metadata["objects_per_prompt"] == {prompt: 1 for prompt in PROMPTS}
    _, frames = decode(tmp_path / "clip" / "clip_segmented.mp4")
    assert len(frames) == 3


# ---------------------------------------------------------------------------------------------
# Complete means every output is whole
# ---------------------------------------------------------------------------------------------


def test_metadata_lists_every_output_with_size_and_checksum(tmp_path, tiny_model_dir, capsys):
    video = write_test_video(tmp_path / "clip.mp4", seconds=2.0)
    code, stderr = run_cli(segment([video], tmp_path, tiny_model_dir), capsys)
    assert code == 0, stderr
    folder = tmp_path / "clip"
    metadata = json.loads((folder / "clip_metadata.json").read_text())
    written = {path.name for path in folder.iterdir()} - {"clip_metadata.json", "windows"}
    assert {entry["file"] for entry in metadata["outputs"].values()} == written
    for entry in metadata["outputs"].values():
        data = (folder / entry["file"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("suffix", "damage"),
    [
        ("_tracks.jsonl", "delete"),
        ("_tracks.jsonl", "cut-to-10-bytes"),
        ("_segmented.mp4", "cut-to-10-bytes"),
        ("_preview.jpg", "delete"),
    ],
    ids=["tracks-deleted", "tracks-cut", "mp4-cut", "preview-deleted"],
)
def test_video_with_a_missing_or_cut_output_is_not_done_and_is_redone(
    tmp_path, tiny_model_dir, capsys, suffix, damage
):
    """What a worker lost while the bucket was still uploading leaves: metadata, but not every
    file it lists, whole. Its windows are whole, so the video is assembled again from them
    (by --summarize or by a run, which says why); without them it is computed again."""
    video = write_test_video(tmp_path / "clip.mp4", seconds=2.0)
    out = tmp_path / "out"
    assert run_cli(segment([video], out, tiny_model_dir), capsys)[0] == 0
    target = out / "clip" / f"clip{suffix}"
    whole = target.read_bytes()

    def break_it() -> None:
        if damage == "delete":
            target.unlink()
        else:
            target.write_bytes(whole[:10])

    break_it()
    assert ps.main(["--summarize", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["counts"]["done"] == 1
    assert target.read_bytes() == whole, "assembled again from the same windows: the same file"

    break_it()
    code, stderr = run_cli(segment([video], out, tiny_model_dir), capsys)
    assert code == 0 and f"skip {video}: complete" not in stderr
    [redo] = [line for line in stderr.splitlines() if line.startswith("redo ")]
    assert target.name in redo, redo
    assert "window 0: computed before" in stderr and target.read_bytes() == whole

    break_it()
    shutil.rmtree(out / "clip" / "windows")
    assert ps.main(["--summarize", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["done"] == 0 and summary["counts"]["missing"] == 1
    capsys.readouterr()

    code, stderr = run_cli(segment([video], out, tiny_model_dir), capsys)
    assert code == 0 and "skip" not in stderr
    [redo] = [line for line in stderr.splitlines() if line.startswith("redo ")]
    assert target.name in redo, redo
    metadata = json.loads((out / "clip" / "clip_metadata.json").read_text())
    assert output_problems(out / "clip", metadata) == []
    _, frames = decode(out / "clip" / "clip_segmented.mp4")
    tracks = (out / "clip" / "clip_tracks.jsonl").read_text().splitlines()
    assert len(frames) == len(tracks) == metadata["frames_processed"] == 2
    code, stderr = run_cli(segment([video], out, tiny_model_dir), capsys)
    assert code == 0 and "skip" in stderr, "whole again, so the next run skips it"
