"""The data outputs beside the MP4: tracks JSONL (COCO RLE), MOTChallenge text, preview sheet."""

from __future__ import annotations

import json
import re

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask

import process_segmentation as ps
from sam3_pipeline.outputs import coco_rle
from sam3_pipeline.overlay import preview_jpeg, preview_picks
from sam3_pipeline.sam3 import Detections, detections_from, model_frames, prepare_frames
from sam3_pipeline.stages import StageTimes
from sam3_pipeline.tracks import box_mask
from sam3_pipeline.video_io import SampledFrame
from conftest import pitch_frame, write_test_video

PROMPTS = ["soccer player", "ball"]


def random_crop_masks(seed: int, size: tuple[int, int], count: int) -> Detections:
    """Blobby masks at random places, some touching the frame's edges, stored cropped."""
    rng = np.random.default_rng(seed)
    height, width = size
    boxes, crops = [], []
    for _ in range(count):
        x0, y0 = int(rng.integers(0, width - 1)), int(rng.integers(0, height - 1))
        x1, y1 = int(rng.integers(x0, width)), int(rng.integers(y0, height))
        crop = rng.random((y1 - y0 + 1, x1 - x0 + 1)) > 0.4
        crop[0, 0] = crop[-1, -1] = True  # the box stays tight
        boxes.append([x0, y0, x1, y1])
        crops.append(crop)
    return Detections(
        np.arange(1, count + 1), ["ball"] * count, np.full(count, 0.5, np.float32), np.array(boxes), crops
    )


@pytest.mark.parametrize("seed", range(5))
def test_coco_rle_of_a_crop_equals_pycocotools_on_the_full_mask(seed):
    size = (37, 53)
    detections = random_crop_masks(seed, size, count=6)
    for index in range(6):
        full = detections.full_mask(index, size)
        rle = coco_rle(detections.boxes[index], detections.masks[index], size)
        assert rle == {
            "size": [37, 53],
            "counts": coco_mask.encode(np.asfortranarray(full.astype(np.uint8)))["counts"].decode(),
        }
        assert np.array_equal(coco_mask.decode(rle).astype(bool), full)


@pytest.mark.parametrize("size", [(37, 53), (1080, 1920)], ids=["small", "1080p"])
@pytest.mark.parametrize("seed", range(3))
def test_a_box_decoded_from_the_rle_alone_is_pycocotools_whole_frame_cut_to_it(seed, size):
    detections = random_crop_masks(seed, size, count=6)
    for index in range(6):
        rle = coco_rle(detections.boxes[index], detections.masks[index], size)
        full = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
        x0, y0, x1, y1 = detections.boxes[index].tolist()
        assert np.array_equal(box_mask(rle, (x0, y0, x1, y1)), full[y0 : y1 + 1, x0 : x1 + 1])
        assert np.array_equal(box_mask(rle, (0, 0, size[1] - 1, size[0] - 1)), full)  # any box, the frame too


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_model_dir):
    """One run of the script on a 3-second clip at 2 fps; returns (output folder, source clip)."""
    root = tmp_path_factory.mktemp("tracks")
    clip = write_test_video(root / "derby.mp4", seconds=3.0, fps=25, size=(320, 180))
    code = ps.main(
        [
            str(clip),
            "--output-dir",
            str(root / "out"),
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--sample-fps",
            "2",
        ]
    )
    assert code == 0
    return root / "out" / "derby", clip


def test_tracks_jsonl_masks_decode_to_what_the_overlay_drew(tracked_run):
    folder, _ = tracked_run
    lines = (folder / "derby_tracks.jsonl").read_text().splitlines()
    metadata = json.loads((folder / "derby_metadata.json").read_text())
    assert len(lines) == metadata["frames_processed"] == 6
    seen_ids = set()
    for number, line in enumerate(lines):
        record = json.loads(line)
        assert record["frame"] == number
        assert record["source_frame"] == metadata["sampled_frame_indices"][number]
        assert record["timestamp"] == pytest.approx(metadata["sampled_timestamps"][number])
        assert record["objects"], "the tiny model has objects on every frame"
        for obj in record["objects"]:
            mask = coco_mask.decode(obj["mask"]).astype(bool)
            assert mask.shape == (180, 320) and obj["mask"]["size"] == [180, 320]
            assert int(mask.sum()) == obj["area"] > 0
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            assert obj["box"] == [cols[0], rows[0], cols[-1], rows[-1]]
            assert obj["prompt"] in PROMPTS and 0 < obj["score"] <= 1
            seen_ids.add(obj["id"])
    assert seen_ids == {o["id"] for o in metadata["objects"]}
    assert metadata["outputs"]["tracks"]["file"] == "derby_tracks.jsonl"


def test_tracks_masks_are_the_masks_the_overlay_draws(tiny_model_dir):
    """On real (tiny) SAM3 output: each RLE decodes to the very mask draw_overlay is given."""
    segmenter = ps.load_segmenter(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    frames = [SampledFrame(i, i / 2, pitch_frame(i, 160, 96), position=i) for i in range(3)]
    checked = 0
    outputs = model_frames(segmenter, prepare_frames(segmenter, frames, StageTimes()), PROMPTS, chunk_frames=100)
    for output in outputs:
        detections = detections_from(output.output, (96, 160))
        for i in range(len(detections.object_ids)):
            decoded = coco_mask.decode(
                coco_rle(detections.boxes[i], detections.masks[i], (96, 160))
            ).astype(bool)
            assert np.array_equal(decoded, detections.full_mask(i, (96, 160)))
            checked += 1
    assert checked >= 3


def test_mot_file_has_ten_columns_one_based_frames_and_matches_tracks(tracked_run):
    folder, _ = tracked_run
    rows = [line.split(",") for line in (folder / "derby_mot.txt").read_text().splitlines()]
    tracks = [json.loads(line) for line in (folder / "derby_tracks.jsonl").read_text().splitlines()]
    assert rows and all(len(row) == 10 for row in rows)
    expected = [
        [
            str(t["frame"] + 1),
            str(o["id"]),
            str(o["box"][0]),
            str(o["box"][1]),
            str(o["box"][2] - o["box"][0] + 1),
            str(o["box"][3] - o["box"][1] + 1),
        ]
        for t in tracks
        for o in t["objects"]
    ]
    assert [row[:6] for row in rows] == expected
    assert min(int(row[0]) for row in rows) == 1 and min(int(row[1]) for row in rows) >= 1
    assert all(row[7:] == ["-1", "-1", "-1"] and 0 < float(row[6]) <= 1 for row in rows)


def test_preview_is_a_jpeg_grid_of_documented_size(tracked_run):
    folder, _ = tracked_run
    data = (folder / "derby_preview.jpg").read_bytes()
    assert data[:3] == b"\xff\xd8\xff"
    sheet = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    # 3 x 2 tiles, 480 px wide, height by the video's aspect ratio (320x180 -> 270)
    assert sheet.shape == (2 * 270, 3 * 480, 3)
    assert sheet[:270].std() > 5 and sheet[270:].std() > 5, "six frames: both rows are filled"


def test_preview_spreads_tiles_evenly_over_the_video():
    picks = preview_picks(100)
    assert picks[0] == 0 and picks[-1] == 99 and len(picks) == 6
    frames = [(float(number), np.full((90, 160, 3), number, dtype=np.uint8)) for number in picks]
    rendered = cv2.imdecode(np.frombuffer(preview_jpeg(frames, (90, 160)), np.uint8), cv2.IMREAD_GRAYSCALE)
    assert rendered.shape == (2 * 270, 3 * 480)
    # each tile's brightness is the number of the frame it shows (read away from the timestamp text)
    shown = [
        int(np.median(rendered[r * 270 + 100 : (r + 1) * 270, c * 480 : (c + 1) * 480]))
        for r in range(2)
        for c in range(3)
    ]
    assert shown == picks == [0, 20, 40, 59, 79, 99], shown


def test_no_tracks_flag_skips_tracks_and_mot_but_keeps_preview(tmp_path, tiny_model_dir):
    clip = write_test_video(tmp_path / "quick.mp4", seconds=1.0)
    assert (
        ps.main(
            [
                str(clip),
                "--output-dir",
                str(tmp_path),
                "--model",
                str(tiny_model_dir),
                "--device",
                "cpu",
                "--no-tracks",
            ]
        )
        == 0
    )
    names = sorted(p.name for p in (tmp_path / "quick").iterdir())
    assert names == ["quick_metadata.json", "quick_preview.jpg", "quick_segmented.mp4", "windows"]
    part, record = sorted(p.name for p in (tmp_path / "quick" / "windows").iterdir())
    assert record == "w00000.json" and re.fullmatch(r"w00000-[0-9a-f]{12}\.mp4", part), (record, part)
