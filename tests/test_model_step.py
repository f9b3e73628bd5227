"""SAM3's step per frame with our changes (sam3_pipeline/model_step.py) against transformers' own:
the same outputs, flat session memory, a fallback to stock where the changes were not checked, and
the model-step benchmark's counters."""

from __future__ import annotations

import subprocess
import sys

import make_tiny_sam3
import numpy as np
import pytest
import torch
from conftest import PROMPTS, REPO, run_cli, segment

sys.path.insert(0, str(REPO / "bench"))
import model_step as bench  # noqa: E402  (bench/model_step.py)

from sam3_pipeline import model_step  # noqa: E402
from sam3_pipeline.sam3 import (  # noqa: E402
    Segmenter,
    enable_sam3_postprocessing,
    open_session,
    track_frame,
)

FRAMES = 30  # past the 16 frames the full-depth tracker reads back, so old frames are pruned
# Thresholds under which the tiny SAM3's objects come and go: up to twice the queries may be
# tracked, a track unmatched for 3 frames is removed, and the scene changes every 8 frames.
CHURN = {"hotstart_delay": 100, "hotstart_unmatch_thresh": 3, "assoc_iou_thresh": 0.5, "trk_assoc_iou_thresh": 0.5}


def churning_frames(count: int, size: int):
    """(size, size, 3) uint8 RGB frames: a random picture sliding sideways, another every 8 frames."""
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(4)]
    for index in range(count):
        yield np.roll(pictures[index // 8 % 4], 3 * index, axis=1)


def run_session(model, step: str, frames=None, prune: bool = False, prompts=PROMPTS):
    """Each frame's object IDs, masks (low-resolution logits), scores and tracker scores, and the
    session's tensor bytes after it. `prune`: prune the session whatever `step` is."""
    assert model_step.apply_model_step(step, model) == step
    processor = make_tiny_sam3.tiny_processor()
    postprocessing = enable_sam3_postprocessing()
    segmenter = Segmenter(model, processor, "tiny", torch.device("cpu"), torch.float32, postprocessing, step)
    session = open_session(segmenter, prompts)
    outputs, sizes = [], []
    frames = frames if frames is not None else bench.synthetic_frames(FRAMES, make_tiny_sam3.IMAGE_SIZE * 4)
    for index, rgb in enumerate(frames):
        pixels = processor.video_processor(videos=[rgb], return_tensors="pt").pixel_values_videos[0]
        with torch.inference_mode():
            output = track_frame(segmenter, session, index, pixels)
        if prune:
            model_step.prune_session(session, index, model_step.frames_read_back(model))
        outputs.append(
            (
                list(output.object_ids),
                {obj_id: mask.clone() for obj_id, mask in output.obj_id_to_mask.items()},
                dict(output.obj_id_to_score),
                dict(output.obj_id_to_tracker_score),
            )
        )
        sizes.append(bench.tensor_bytes(session))
    return outputs, sizes


def churning_model(prompts: int, objects_per_prompt: int):
    """The full-depth tiny SAM3 with `CHURN`: with 2 or more queries per prompt, tracks come and go."""
    model = make_tiny_sam3.tiny_model(prompts, objects_per_prompt, full_depth=True)
    for name, value in CHURN.items():
        setattr(model, name, value)
    model.max_num_objects = 2 * prompts * objects_per_prompt
    return model


def seen_objects(outputs) -> int:
    return len({obj_id for ids, *_ in outputs for obj_id in ids})


@pytest.mark.slow
def test_pruning_the_session_changes_no_output_bit():
    frames = list(churning_frames(FRAMES, make_tiny_sam3.IMAGE_SIZE * 4))
    kept, _ = run_session(churning_model(len(PROMPTS), 2), model_step.STOCK, frames)
    pruned, _ = run_session(churning_model(len(PROMPTS), 2), model_step.STOCK, frames, prune=True)
    assert seen_objects(kept) > 8, "objects came and went"
    for frame, (expected, got) in enumerate(zip(kept, pruned)):
        assert expected[0] == got[0] and expected[2:] == got[2:], f"frame {frame}"
        assert all(torch.equal(expected[1][obj_id], got[1][obj_id]) for obj_id in expected[0]), f"frame {frame}"


@pytest.mark.slow
@pytest.mark.parametrize("objects", [1, 10, 20])
def test_objects_tracked_together_get_the_ids_masks_and_scores_of_one_by_one(objects, monkeypatch):
    batches, heads = [], model_step.mask_heads
    monkeypatch.setattr(model_step, "mask_heads", lambda *args: batches.append(args[1].shape[0]) or heads(*args))
    prompts = PROMPTS if objects > 1 else PROMPTS[:1]
    per_prompt = objects // len(prompts)
    frames = list(churning_frames(FRAMES, make_tiny_sam3.IMAGE_SIZE * 4))
    stock, _ = run_session(churning_model(len(prompts), per_prompt), model_step.STOCK, frames, prompts=prompts)
    fast, _ = run_session(churning_model(len(prompts), per_prompt), model_step.FAST, frames, prompts=prompts)
    if objects > 1:
        assert max(batches) >= objects, "the objects went through the heads together"
        assert seen_objects(stock) > 2 * objects, "objects came and went"
    for frame, (expected, got) in enumerate(zip(stock, fast)):
        assert expected[0] == got[0], f"frame {frame}: IDs"
        for obj_id in expected[0]:
            assert torch.equal(expected[1][obj_id] > 0, got[1][obj_id] > 0), f"frame {frame}, object {obj_id}: mask"
            torch.testing.assert_close(got[1][obj_id], expected[1][obj_id], rtol=1e-5, atol=1e-5)
        for scores in (2, 3):
            assert expected[scores].keys() == got[scores].keys()
            differences = [abs(expected[scores][key] - got[scores][key]) for key in expected[scores]]
            assert max(differences, default=0) <= 1e-5, f"frame {frame}"


def test_the_fast_step_keeps_the_session_flat_once_the_memory_bank_is_full():
    _, stock = run_session(make_tiny_sam3.tiny_model(len(PROMPTS), 2, full_depth=True), model_step.STOCK)
    _, fast = run_session(make_tiny_sam3.tiny_model(len(PROMPTS), 2, full_depth=True), model_step.FAST)
    filled = model_step.frames_read_back(make_tiny_sam3.tiny_model(full_depth=True)) + 1
    assert fast[filled:] == [fast[filled]] * len(fast[filled:]), "the session grew after its memory bank filled"
    assert stock[-1] - stock[filled] > (len(stock) - 1 - filled) * 10_000, "transformers' own session keeps every frame"
    assert fast[-1] < stock[-1] / 2


def test_outputs_are_byte_identical_with_the_stock_step(tmp_path, tiny_model_dir, make_video, capsys):
    clip = make_video(tmp_path / "clip.mp4", seconds=2.0, fps=15)  # 30 sampled frames: old ones get pruned
    results = {}
    for step in model_step.MODEL_STEPS:
        out = tmp_path / step
        code, err = run_cli(segment([clip], out, tiny_model_dir, "--sample-fps", "0", "--model-step", step), capsys)
        assert code == 0, err
        assert f"step per frame: {step}" in err
        results[step] = {path.name: path.read_bytes() for path in (out / "clip").iterdir() if path.is_file()}
    assert results[model_step.FAST].keys() == results[model_step.STOCK].keys()
    for name in ("clip_segmented.mp4", "clip_tracks.jsonl", "clip_mot.txt"):
        assert results[model_step.FAST][name] == results[model_step.STOCK][name], name


def test_another_transformers_runs_the_stock_step_with_one_warning(capsys):
    model = make_tiny_sam3.tiny_model()
    assert model_step.choose_model_step(model_step.FAST, model, transformers_version="5.99.0") == model_step.STOCK
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning:") and "5.99.0" in err
    assert model_step.choose_model_step(model_step.FAST, model) == model_step.FAST
    assert model_step.choose_model_step(model_step.STOCK, model) == model_step.STOCK
    assert capsys.readouterr().err == ""


def test_a_session_without_the_names_the_changes_edit_runs_the_stock_step(capsys, monkeypatch):
    from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

    stock_init = Sam3VideoInferenceSession.__init__

    def renamed_init(self, *args, **kwargs):  # as if a release renamed the frame-wise scores
        stock_init(self, *args, **kwargs)
        self.tracker_scores_per_frame = self.__dict__.pop("obj_id_to_tracker_score_frame_wise")

    monkeypatch.setattr(Sam3VideoInferenceSession, "__init__", renamed_init)
    assert model_step.choose_model_step(model_step.FAST, make_tiny_sam3.tiny_model()) == model_step.STOCK
    assert "obj_id_to_tracker_score_frame_wise" in capsys.readouterr().err


def test_the_counters_count_a_known_sequence_of_calls():
    operations, calls = bench.OperationCounter(), bench.HostWaitCounter()
    with torch.inference_mode(), calls, operations:
        a = torch.ones(4)
        b = (a + a).view(2, 2)  # ones, add: two kernels; the view none
        total = b.sum()  # one kernel
        total.item()  # a wait at both levels
        b[b > 1]  # gt: a kernel; boolean indexing: a wait at both levels
        torch.tensor([1, 2], device="cpu")  # a blocking copy from a Python list
    assert operations.kernels == 5 + 1  # ones, add, sum, gt, the indexing's gather (+ its nonzero)
    assert operations.waits == 2
    assert calls.waits == 3


@pytest.mark.slow
def test_the_small_mode_writes_its_table(tmp_path):
    page = tmp_path / "performance.md"
    page.write_text(f"before\n{bench.TABLE_START}\nold\n{bench.TABLE_END}\nafter\n")
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "model_step.py"), "--small", "--readme", str(page)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    text = page.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    rows = [line for line in text.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 2
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        stock_ops, fast_ops = (float(n.replace(",", "")) for n in cells[1].split(" / "))
        assert stock_ops > 100 and fast_ops > 100
        assert cells[3].endswith("/ 0.000 MB")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_association_on_the_host_decides_as_transformers_does(dtype):
    model = make_tiny_sam3.tiny_model()
    model.high_conf_thresh, model.high_iou_thresh = 0.5, 0.3  # so that some detections are high-confidence matches
    generator = torch.Generator().manual_seed(0)
    for case in range(40):
        detections, tracks = case % 7, (case * 3) % 8
        size = (8, 8)
        det_masks = torch.randn(detections, *size, generator=generator).to(dtype)
        trk_masks = torch.randn(tracks, *size, generator=generator).to(dtype)
        if tracks and detections:  # some tracks overlap a detection closely, some are empty
            trk_masks[0] = det_masks[0] + 0.1
            trk_masks[-1] = -1
        det_scores = torch.rand(detections, generator=generator).to(dtype)
        det_prompts = torch.randint(0, 2, (detections,), generator=generator)
        trk_prompts = torch.randint(0, 2, (tracks,), generator=generator)
        trk_ids = [int(i) for i in torch.randperm(50, generator=generator)[:tracks]]
        arguments = (det_masks, det_scores, trk_masks, trk_ids, det_prompts, trk_prompts)
        expected = type(model)._associate_det_trk(model, *arguments)
        assert model_step.associate_on_the_host(model, *arguments) == expected, f"case {case}"


def test_the_detector_grid_is_computed_once_with_transformers_values():
    decoder = make_tiny_sam3.tiny_model().detector_model.detr_decoder
    stock = decoder._get_coords
    remembered = model_step.remember_coords(stock)
    for _ in range(3):
        height, width = torch.tensor(4), torch.tensor(4)
        got, expected = remembered(height, width, torch.float32, "cpu"), stock(height, width, torch.float32, "cpu")
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert remembered(torch.tensor(4), torch.tensor(4), torch.float32, "cpu")[0] is got[0]


@pytest.mark.slow
def test_high_confidence_matches_and_reconditioning_give_the_stock_outputs():
    def reconditioning_model():
        model = churning_model(len(PROMPTS), 2)
        model.high_conf_thresh, model.high_iou_thresh, model.recondition_every_nth_frame = 0.0, 0.0, 4
        return model

    frames = list(churning_frames(FRAMES, make_tiny_sam3.IMAGE_SIZE * 4))
    stock, _ = run_session(reconditioning_model(), model_step.STOCK, frames)
    fast, _ = run_session(reconditioning_model(), model_step.FAST, frames)
    for frame, (expected, got) in enumerate(zip(stock, fast)):
        assert expected[0] == got[0], f"frame {frame}: IDs"
        for obj_id in expected[0]:
            assert torch.equal(expected[1][obj_id] > 0, got[1][obj_id] > 0), f"frame {frame}, object {obj_id}"
        assert all(abs(expected[3][key] - got[3][key]) <= 1e-5 for key in expected[3]), f"frame {frame}"
