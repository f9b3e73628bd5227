"""SAM3's own post-processing (detection NMS, hole filling, sprinkle removal) runs without `kernels`.

transformers skips all three where the `kernels` package does not load; process_segmentation.py
hands it local implementations instead. These tests drive transformers' real functions and the
tiny SAM3 with them, and check the local operations against independent references.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from scipy import ndimage
from transformers.models.sam3_video import modeling_sam3_video as sam3

import make_tiny_sam3
import process_segmentation as ps
import sam3_pipeline.sam3
from sam3_pipeline.sam3 import LocalCvUtils
from conftest import REPO, write_test_video

PROMPTS = ["soccer player", "ball"]
EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def random_masks(seed: int, count: int, size: tuple[int, int], density: float) -> np.ndarray:
    """(count, 1, H, W) uint8 0/1 masks of random blobs (smoothed noise), some touching the edges."""
    rng = np.random.default_rng(seed)
    noise = rng.random((count, *size))
    smooth = np.stack([ndimage.uniform_filter(plane, size=3) for plane in noise])
    return (smooth < density).astype(np.uint8)[:, None]


@pytest.mark.parametrize(
    ("size", "density"),
    [((16, 16), 0.45), ((288, 288), 0.5), ((37, 53), 0.3), ((64, 65), 0.6)],
    ids=["16x16", "288x288", "odd-37x53", "64x65-dense"],
)
def test_local_connected_components_match_scipy_label(size, density):
    """Foreground (sprinkles) and background (holes) alike, as transformers uses both."""
    blobs = random_masks(seed=size[0] * size[1], count=6, size=size, density=density)
    masks = np.concatenate([blobs, 1 - blobs])
    labels, counts = LocalCvUtils.cc_2d(torch.from_numpy(masks), get_counts=True)
    assert labels.shape == counts.shape == masks.shape and counts.dtype == torch.int32
    components = 0
    for index, mask in enumerate(masks[:, 0]):
        reference, found = ndimage.label(mask, structure=EIGHT_CONNECTED)
        components += found
        areas = np.bincount(reference.ravel())
        areas[0] = 0
        np.testing.assert_array_equal(counts[index, 0].numpy(), areas[reference])
        ours = labels[index, 0].numpy()
        # Same partition: each reference component is exactly one of ours, and the reverse.
        pairs = set(zip(reference[mask > 0].tolist(), ours[mask > 0].tolist(), strict=True))
        assert len(pairs) == found == len({b for _, b in pairs}) and (ours[mask == 0] == 0).all()
    assert components > 4 * len(masks), "the random masks should have many components"


@pytest.mark.parametrize("threshold", [0.1, 0.5, 0.7])
def test_local_nms_matches_torchvision_on_box_ious(threshold):
    """Greedy NMS over an IoU matrix must keep what torchvision's box NMS keeps for those IoUs."""
    generator = torch.Generator().manual_seed(int(threshold * 10))
    corners = torch.rand(60, 2, generator=generator) * 30  # crowded, so that many boxes overlap
    boxes = torch.cat([corners, corners + 20 + torch.rand(60, 2, generator=generator) * 10], dim=1)
    scores = torch.rand(60, generator=generator)
    ours = LocalCvUtils.generic_nms(torchvision.ops.box_iou(boxes, boxes), scores, threshold)
    reference = torchvision.ops.nms(boxes, scores, threshold)
    assert 1 < len(reference) < 60, "the case should both keep and drop boxes"
    assert sorted(ours.tolist()) == sorted(reference.tolist())


def test_transformers_fill_holes_fills_small_holes_and_removes_sprinkles(monkeypatch):
    """transformers' own `fill_holes_in_mask_scores` with the local operations: a hole up to
    `fill_hole_area` pixels is filled, a bigger one stays; a sprinkle is removed, the object stays."""
    monkeypatch.setattr(sam3, "cv_utils_kernel", LocalCvUtils())
    scores = torch.full((1, 1, 64, 64), -5.0)
    scores[0, 0, 4:40, 4:40] = 5.0  # the object, 1296 pixels
    scores[0, 0, 10:14, 10:14] = -5.0  # a hole of 16 pixels: filled
    scores[0, 0, 20:25, 20:25] = -5.0  # a hole of 25 pixels: kept
    scores[0, 0, 50:53, 50:53] = 5.0  # a sprinkle of 9 pixels: removed
    result = sam3.fill_holes_in_mask_scores(scores, max_area=16)[0, 0]
    assert (result[10:14, 10:14] > 0).all(), "the 16-pixel hole must be filled"
    assert (result[20:25, 20:25] <= 0).all(), "the 25-pixel hole is over max_area and must stay"
    assert (result[50:53, 50:53] <= 0).all(), "the 9-pixel sprinkle must be removed"
    assert (result[4:10, 4:40] > 0).all(), "the object itself must stay"
    assert int((result > 0).sum()) == 1296 - 25


@pytest.fixture(scope="module")
def duplicating_model_dir(tmp_path_factory):
    """A tiny SAM3 whose 4 queries per prompt all find the same blob, with SAM3's default NMS."""
    return make_tiny_sam3.save_tiny_sam3(
        tmp_path_factory.mktemp("dup"), num_prompts=2, objects_per_prompt=4, det_nms_thresh=0.1
    )


def run_and_read_metadata(video, output_dir, model_dir) -> dict:
    args = [str(video), "--output-dir", str(output_dir), "--model", str(model_dir), "--device", "cpu"]
    assert ps.main(args) == 0
    return json.loads((output_dir / video.stem / f"{video.stem}_metadata.json").read_text())


def test_duplicate_detections_are_suppressed_to_one_per_prompt(tmp_path, duplicating_model_dir, monkeypatch):
    video = write_test_video(tmp_path / "clip.mp4", seconds=3.0)
    metadata = run_and_read_metadata(video, tmp_path / "out", duplicating_model_dir)
    assert metadata["postprocessing"] == "local"
    assert metadata["objects_per_prompt"] == {prompt: 1 for prompt in PROMPTS}
    tracks = (tmp_path / "out" / "clip" / "clip_tracks.jsonl").read_text().splitlines()
    assert [len(json.loads(line)["objects"]) for line in tracks] == [2, 2, 2]

    # What transformers does on its own without `kernels`: every duplicate becomes an object.
    monkeypatch.setattr(sam3, "cv_utils_kernel", False)
    monkeypatch.setattr(sam3_pipeline.sam3, "enable_sam3_postprocessing", lambda: "skipped")
    skipped = run_and_read_metadata(video, tmp_path / "without", duplicating_model_dir)
    assert all(count > 1 for count in skipped["objects_per_prompt"].values()), skipped["objects_per_prompt"]


@pytest.mark.slow
def test_run_never_says_post_processing_was_skipped(tmp_path, tiny_model_dir):
    video = write_test_video(tmp_path / "clip.mp4", seconds=1.0)
    result = subprocess.run(
        [sys.executable, str(REPO / "process_segmentation.py"), str(video), "--output-dir", str(tmp_path),
         "--model", str(tiny_model_dir), "--device", "cpu"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "SAM3 post-processing: local" in result.stderr
    assert "skipped" not in result.stderr.lower() and "kernels library is not installed" not in result.stderr
