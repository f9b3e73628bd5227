"""SAM3 through transformers: load once, track a stream of frames in windows of fresh sessions, masks on the CPU."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections import deque
from collections.abc import Container, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from sam3_pipeline.hub import must_load_from_cache
from sam3_pipeline.messages import UsageError, one_line
from sam3_pipeline.model_step import FAST, apply_model_step, frames_read_back, prune_session
from sam3_pipeline.stages import StageTimes
from sam3_pipeline.video_io import SampledFrame

MAX_PROMPT_TOKENS = 32  # SAM3's text encoder pads every prompt to exactly this many tokens

# Frames per SAM3 session: the unit of work. With transformers' own step memory grows linearly
# within a session (full size, bfloat16: 74 MB per frame with 20 objects, 10.0 GB peak at 100
# frames, 17.4 GB at 200), and 100 was the fastest of 50/100/200 (docs/performance.md); the fast
# step keeps the session flat (model_step.prune_session).
DEFAULT_CHUNK_FRAMES = 100
MATCH_IOU = 0.3  # least mask IoU, on the frame two windows share, to keep an object's ID


@dataclasses.dataclass(frozen=True)
class Detections:
    """SAM3's objects on one frame, on the CPU, each mask cropped to its box."""

    object_ids: np.ndarray  # (N,) int64, stable across the frames of one video
    prompts: list[str]  # N prompt texts
    scores: np.ndarray  # (N,) float32 detection scores
    boxes: np.ndarray  # (N, 4) int64 XYXY pixels, inclusive: the tight box of each mask
    masks: list[np.ndarray]  # N arrays (y1 - y0 + 1, x1 - x0 + 1) bool: the mask inside its box

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros(0, np.int64), [], np.zeros(0, np.float32), np.zeros((0, 4), np.int64), [])

    def full_mask(self, index: int, size: tuple[int, int]) -> np.ndarray:
        """Object `index`'s mask as a (H, W) bool array of the frame's `size`."""
        mask = np.zeros(size, dtype=bool)
        x0, y0, x1, y1 = self.boxes[index]
        mask[y0 : y1 + 1, x0 : x1 + 1] = self.masks[index]
        return mask


@dataclasses.dataclass(frozen=True)
class Segmenter:
    """The model and everything needed to run it, built once per process."""

    model: Any  # transformers.Sam3VideoModel
    processor: Any  # transformers.Sam3VideoProcessor
    model_name: str
    device: torch.device
    dtype: torch.dtype
    postprocessing: str  # whose NMS and hole filling SAM3 runs with: "kernels" or "local"
    model_step: str = FAST  # model_step.FAST (ours) or STOCK (transformers' own step per frame)


class LocalCvUtils:
    """SAM3's post-processing operations, computed locally with OpenCV.

    transformers' SAM3 video model runs detection NMS, hole filling and sprinkle removal through
    the `kernels-community/cv-utils` kernels, and silently skips all three where they do not load
    (no `kernels` package, no Hub access, no build for this torch/CUDA). This object offers the
    same two operations, so those steps always run.
    """

    @staticmethod
    def generic_nms(
        ious: torch.Tensor, scores: torch.Tensor, iou_threshold: float, use_iou_matrix: bool = True
    ) -> torch.Tensor:
        """Greedy NMS over an (N, N) IoU matrix: keep the best-scoring detection, drop all whose
        IoU with it exceeds `iou_threshold`, repeat. Returns the kept indices, (K,) int64."""
        if not use_iou_matrix:
            raise ValueError("only NMS over a precomputed IoU matrix is implemented")
        overlaps = (ious.float() > iou_threshold).cpu().numpy()
        suppressed = np.zeros(len(overlaps), dtype=bool)
        kept = []
        for index in np.argsort(-scores.float().cpu().numpy(), kind="stable"):
            if not suppressed[index]:
                kept.append(index)
                suppressed |= overlaps[index]
        return torch.tensor(kept, dtype=torch.int64, device=scores.device)

    @staticmethod
    def cc_2d(masks: torch.Tensor, get_counts: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """8-connected components of (B, 1, H, W) uint8 masks.

        Returns labels, (B, 1, H, W) int32 (0 off the mask, components numbered from 1), and
        counts, (B, 1, H, W) int32: the area of each pixel's component (0 off the mask).
        """
        array = masks.cpu().numpy()
        labels = np.zeros(array.shape, dtype=np.int32)
        counts = np.zeros(array.shape, dtype=np.int32)
        for index, mask in enumerate(array[:, 0]):
            _, labels[index, 0], stats, _ = cv2.connectedComponentsWithStats(
                mask, connectivity=8, ltype=cv2.CV_32S
            )
            areas = stats[:, cv2.CC_STAT_AREA].astype(np.int32)
            areas[0] = 0
            counts[index, 0] = areas[labels[index, 0]]
        return torch.from_numpy(labels).to(masks.device), torch.from_numpy(counts).to(masks.device)


def enable_sam3_postprocessing() -> str:
    """Make transformers run SAM3's detection NMS, hole filling and sprinkle removal.

    The `kernels` package's implementation where it loads, else `LocalCvUtils`. Returns which.
    """
    from transformers.models.sam3_video import modeling_sam3_video as sam3
    from transformers.utils import is_kernels_available
    from transformers.utils import logging as hf_logging

    if sam3.cv_utils_kernel is None and is_kernels_available():
        logger = hf_logging.get_logger(sam3.__name__)
        level = logger.level
        logger.setLevel(hf_logging.ERROR)  # its "will be skipped" warning would not be true here
        try:
            sam3._load_cv_utils_kernel_once()
        finally:
            logger.setLevel(level)
    if not sam3.cv_utils_kernel:
        sam3.cv_utils_kernel = LocalCvUtils()
    return "local" if isinstance(sam3.cv_utils_kernel, LocalCvUtils) else "kernels"


def load_segmenter(model_name: str, device: torch.device, dtype: torch.dtype, model_step: str = FAST) -> Segmenter:
    """Load SAM3 once. A local directory loads offline; a Hub ID is checked first (`hub.must_load_from_cache`:
    one request, a clear line on failure), then uses HF_TOKEN for the gated checkpoint. `model_step`:
    see `model_step.choose_model_step`."""
    from transformers import Sam3VideoModel, Sam3VideoProcessor

    looks_like_path = model_name.startswith((os.sep, ".", "~")) or model_name.count("/") > 1
    if looks_like_path:
        if not Path(model_name).expanduser().is_dir():
            raise UsageError(f"cannot load model {model_name}: no such directory")
        model_name = str(Path(model_name).expanduser())
    token = os.environ.get("HF_TOKEN") or None
    from_cache = False if Path(model_name).is_dir() else must_load_from_cache(model_name)
    try:
        processor = Sam3VideoProcessor.from_pretrained(model_name, token=token, local_files_only=from_cache)
        model = Sam3VideoModel.from_pretrained(model_name, token=token, dtype=dtype, local_files_only=from_cache)
    except (OSError, ValueError) as error:
        hint = " (from the local cache only, which holds part of the download)" if from_cache else ""
        raise UsageError(f"cannot load model {model_name}: {one_line(error)}{hint}") from None
    postprocessing = enable_sam3_postprocessing()
    step = apply_model_step(model_step, model)
    return Segmenter(model.to(device).eval(), processor, model_name, device, dtype, postprocessing, step)


def check_prompts(processor: Any, prompts: Sequence[str]) -> None:
    """Reject prompts the text encoder cannot take, before any video is touched."""
    for prompt in prompts:
        tokens = len(processor.tokenizer(prompt).input_ids)
        if tokens > MAX_PROMPT_TOKENS:
            raise UsageError(
                f'prompt "{prompt}" is {tokens} tokens; SAM3\'s text encoder takes at most {MAX_PROMPT_TOKENS}: shorten it'
            )


def output_span(low: int, high: int, in_size: int, out_size: int) -> tuple[int, int]:
    """The output pixels of a bilinear upsample that can depend on source pixels [low, high).

    The outermost source pixels also feed the clamped outputs out to the image border.
    """
    scale = out_size / in_size
    start = 0 if low == 0 else max(math.floor((low + 0.5) * scale - 0.5), 0)
    stop = out_size if high == in_size else min(math.ceil((high - 0.5) * scale + 0.5), out_size)
    return start, stop


def upsample_region(
    logits: np.ndarray, size: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]
) -> np.ndarray:
    """Bilinear upsample of (h, w) float32 logits to `size` (H, W), computed only for output
    rows [rows) and columns [cols): the same values as that region of torch's
    `interpolate(mode="bilinear", align_corners=False)` over the whole frame (to ~1e-4)."""
    (height, width), (h, w) = size, logits.shape
    if 3 * (rows[1] - rows[0]) * (cols[1] - cols[0]) > height * width:
        # Most of the frame: OpenCV's separable resize of the whole frame samples the same points
        # (to float rounding) about 3x faster than warping the region.
        whole = cv2.resize(logits, (width, height), interpolation=cv2.INTER_LINEAR)
        return whole[rows[0] : rows[1], cols[0] : cols[1]]
    scale_y, scale_x = h / height, w / width
    # output pixel (x, y) of the region samples source ((x + x0 + 0.5) * scale - 0.5, ...), clamped
    to_source = np.array(
        [[scale_x, 0.0, (cols[0] + 0.5) * scale_x - 0.5], [0.0, scale_y, (rows[0] + 0.5) * scale_y - 0.5]]
    )
    return cv2.warpAffine(
        logits,
        to_source,
        (cols[1] - cols[0], rows[1] - rows[0]),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )


def masks_from_logits(
    logits: np.ndarray, priorities: Sequence[float], groups: Sequence[int], size: tuple[int, int]
) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Full-resolution masks from SAM3's low-resolution mask logits, each cropped to its box.

    logits: (N, h, w) float32. Returns per object (box (4,) int64 XYXY inclusive, (bh, bw) bool
    crop), or None when its mask is empty.
    Same masks as `Sam3VideoProcessor.postprocess_outputs` (upsample, threshold at 0, then within
    a prompt group each pixel goes to the object with the highest priority, ties to the earlier
    object), but every step runs only inside each object's box: that processor upsamples and
    compares every object over the whole frame, which dominated the time per frame on CPU.
    """
    height, width = size
    count, h, w = logits.shape
    crops: list[tuple[int, int, np.ndarray] | None] = [None] * count
    for i in range(count):
        positive = logits[i] > 0
        rows, cols = np.flatnonzero(positive.any(axis=1)), np.flatnonzero(positive.any(axis=0))
        if rows.size == 0:
            continue
        # A margin of one source pixel covers the outputs that interpolate towards the mask.
        y0, y1 = output_span(max(rows[0] - 1, 0), min(rows[-1] + 2, h), h, height)
        x0, x1 = output_span(max(cols[0] - 1, 0), min(cols[-1] + 2, w), w, width)
        crops[i] = (y0, x0, upsample_region(logits[i], size, (y0, y1), (x0, x1)) > 0)

    claimed: dict[int, np.ndarray] = {}  # per prompt group: (H, W) bool, pixels already taken
    results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * count
    for i in sorted(range(count), key=lambda k: (-priorities[k], k)):
        if crops[i] is None:
            continue
        y0, x0, crop = crops[i]
        if groups[i] not in claimed:
            claimed[groups[i]] = np.zeros(size, dtype=bool)
        taken = claimed[groups[i]][y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]]
        np.greater(crop, taken, out=crop)  # crop and not taken
        taken |= crop
        left, top, box_w, box_h = cv2.boundingRect(crop.view(np.uint8))
        if box_w:
            box = np.array([x0 + left, y0 + top, x0 + left + box_w - 1, y0 + top + box_h - 1], dtype=np.int64)
            results[i] = (box, crop[top : top + box_h, left : left + box_w])
    return results


@dataclasses.dataclass(frozen=True)
class PreparedFrame:
    """A sampled frame and SAM3's input made from it."""

    sample: SampledFrame
    pixels: torch.Tensor  # (3, S, S) float, resized and normalised for SAM3, on the model's device


@dataclasses.dataclass(frozen=True)
class SessionOutput:
    """One frame of SAM3's output, on the CPU: what masks and records are made from."""

    object_ids: list[int]  # this session's IDs, hidden objects left out
    prompts: list[str]
    scores: list[float]  # detection scores
    priorities: list[float]  # tracker scores: which object a pixel goes to where masks overlap
    groups: list[int]  # prompt index: overlaps are resolved within a prompt only
    logits: np.ndarray  # (N, h, w) float32 low-resolution mask logits


@dataclasses.dataclass(frozen=True)
class ModelFrame:
    """A frame through SAM3, in the order of the video."""

    sample: SampledFrame
    window: int  # which session (window of frames) it came from, from 0
    shared: bool  # the frame this window shares with the one before: for matching IDs only
    output: SessionOutput


def prepare_frames(
    segmenter: Segmenter, samples: Iterable[SampledFrame], times: StageTimes
) -> Iterator[PreparedFrame]:
    """SAM3's input for each frame: independent of the session, so it can be made ahead of it."""
    for sample in samples:
        with times.measure("preprocess"):
            pixels = segmenter.processor.video_processor(
                videos=[sample.rgb], device=segmenter.device, return_tensors="pt"
            ).pixel_values_videos[0]
        yield PreparedFrame(sample, pixels)


def session_output(output: Any, session: Any) -> SessionOutput:
    """One frame of `Sam3VideoModel` output, hidden objects left out, its logits on the CPU."""
    hidden = set(output.suppressed_obj_ids or ()) | set(session.hotstart_removed_obj_ids)
    object_ids = [obj_id for obj_id in sorted(output.obj_id_to_mask) if obj_id not in hidden]
    logits = (
        torch.cat([output.obj_id_to_mask[obj_id] for obj_id in object_ids]).float().cpu().numpy()
        if object_ids
        else np.zeros((0, 1, 1), np.float32)
    )
    return SessionOutput(
        object_ids=object_ids,
        prompts=[session.prompts[session.obj_id_to_prompt_id[obj_id]] for obj_id in object_ids],
        scores=[float(output.obj_id_to_score[obj_id]) for obj_id in object_ids],
        priorities=[float(output.obj_id_to_tracker_score.get(obj_id, 0.0)) for obj_id in object_ids],
        groups=[session.obj_id_to_prompt_id[obj_id] for obj_id in object_ids],
        logits=logits,
    )


def detections_from(output: SessionOutput, size: tuple[int, int]) -> Detections:
    """The objects to draw on a frame of `size` (H, W): full-resolution masks cut to their boxes;
    objects whose mask is empty at that size are left out."""
    if not output.object_ids:
        return Detections.empty()
    masks = masks_from_logits(output.logits, output.priorities, output.groups, size)
    kept = [index for index, mask in enumerate(masks) if mask is not None]
    return Detections(
        object_ids=np.array([output.object_ids[i] for i in kept], dtype=np.int64),
        prompts=[output.prompts[i] for i in kept],
        scores=np.array([output.scores[i] for i in kept], dtype=np.float32),
        boxes=np.array([masks[i][0] for i in kept], dtype=np.int64).reshape(-1, 4),
        masks=[masks[i][1] for i in kept],
    )


def open_session(segmenter: Segmenter, prompts: Sequence[str]) -> Any:
    """A fresh streaming SAM3 session (transformers' `Sam3VideoInferenceSession`) with `prompts`."""
    session = segmenter.processor.init_video_session(inference_device=segmenter.device, dtype=segmenter.dtype)
    segmenter.processor.add_text_prompt(session, list(prompts))
    return session


def track_frame(segmenter: Segmenter, session: Any, frame_idx: int, pixels: torch.Tensor) -> Any:
    """SAM3's step on the session's next frame, `pixels` (3, S, S) from `prepare_frames`; returns
    `Sam3VideoSegmentationOutput`. Call under `torch.inference_mode()`."""
    session.add_new_frame(pixels, frame_idx=frame_idx)
    output = segmenter.model(inference_session=session, frame_idx=frame_idx)
    session.hotstart_removed_obj_ids.update(output.removed_obj_ids)
    if segmenter.model_step == FAST:
        prune_session(session, frame_idx, frames_read_back(segmenter.model))
    return output


def session_outputs(
    segmenter: Segmenter, frames: Iterable[PreparedFrame], prompts: Sequence[str], times: StageTimes
) -> Iterator[tuple[PreparedFrame, SessionOutput]]:
    """Run SAM3 over streamed frames in one fresh session, all prompts at once.

    This is `propagate_in_video_iterator` fed frame by frame: the session is not handed the
    frames up front, so they are not all decoded at once. Like that iterator, outputs are held
    back `hotstart_delay` frames so that SAM3 can drop spurious objects before they are drawn.
    """
    session = open_session(segmenter, prompts)
    pending: deque[tuple[PreparedFrame, Any]] = deque()
    delay = max(int(segmenter.model.hotstart_delay), 1)
    # Inference mode is entered per call, never held across a `yield`: a generator left suspended
    # (its video failed further down) would otherwise leave it switched on, and restore it out of
    # turn when collected, in the middle of the next video's session.
    for frame_idx, frame in enumerate(frames):
        with times.measure("sam3"), torch.inference_mode():
            output = track_frame(segmenter, session, frame_idx, frame.pixels)
        pending.append((frame, output))
        if len(pending) >= delay:
            frame, output = pending.popleft()
            with times.measure("sam3"), torch.inference_mode():
                ready = session_output(output, session)
            yield frame, ready
    while pending:
        frame, output = pending.popleft()
        with times.measure("sam3"), torch.inference_mode():
            ready = session_output(output, session)
        yield frame, ready


def window_of(position: int, chunk_frames: int) -> int:
    """The window a sample at this grid position belongs to. Window 0 holds positions
    0..chunk_frames-1; each later window the next chunk_frames-1 positions, after the frame it
    shares with the window before (the last sample at or before `shared_position`)."""
    return max(0, (position - 1) // (chunk_frames - 1))


def shared_position(window: int, chunk_frames: int) -> int:
    """The last grid position before window `window` (>= 1): the window shares the last sample at
    or before it with the window before."""
    return window * (chunk_frames - 1)


def model_frames(
    segmenter: Segmenter,
    frames: Iterable[PreparedFrame],
    prompts: Sequence[str],
    chunk_frames: int,
    times: StageTimes | None = None,
    first_window: int = 0,
    skip: Container[int] = (),
) -> Iterator[ModelFrame]:
    """SAM3 over a stretch of video of any length, one fresh session per window (`window_of`).

    SAM3's session keeps every frame and per-object memory for every frame, so memory would grow
    with the video. Each window is a fresh session, first fed the last frame of the window before
    (which comes out of it marked `shared`, so that its objects can be matched to that window's),
    then its own frames. Frames before `first_window` only lead into it (`sample_frames(after=)`
    starts with one such frame); windows in `skip` (computed before) are read past, not run.
    """
    times = times if times is not None else StageTimes()
    frames = iter(frames)
    upcoming = next(frames, None)
    lead: PreparedFrame | None = None
    while upcoming is not None and window_of(upcoming.sample.position, chunk_frames) < first_window:
        lead, upcoming = upcoming, next(frames, None)
    while upcoming is not None:
        window = window_of(upcoming.sample.position, chunk_frames)

        def members(window: int = window) -> Iterator[PreparedFrame]:
            nonlocal upcoming
            while upcoming is not None and window_of(upcoming.sample.position, chunk_frames) == window:
                yield upcoming
                upcoming = next(frames, None)

        if window in skip:
            for lead in members():  # noqa: B007 (the window's last frame leads into the next one)
                pass
            continue
        feed = itertools.chain([lead] if lead else [], members())
        for index, (frame, output) in enumerate(session_outputs(segmenter, feed, prompts, times)):
            yield ModelFrame(frame.sample, window, shared=lead is not None and index == 0, output=output)
            last = frame
        lead = last


def mask_iou(box_a: np.ndarray, mask_a: np.ndarray, box_b: np.ndarray, mask_b: np.ndarray) -> float:
    """IoU of two box-cropped masks (boxes XYXY inclusive)."""
    x0, y0 = max(box_a[0], box_b[0]), max(box_a[1], box_b[1])
    x1, y1 = min(box_a[2], box_b[2]), min(box_a[3], box_b[3])
    if x1 < x0 or y1 < y0:
        return 0.0
    a = mask_a[y0 - box_a[1] : y1 - box_a[1] + 1, x0 - box_a[0] : x1 - box_a[0] + 1]
    b = mask_b[y0 - box_b[1] : y1 - box_b[1] + 1, x0 - box_b[0] : x1 - box_b[0] + 1]
    intersection = int(np.count_nonzero(a & b))
    union = int(np.count_nonzero(mask_a)) + int(np.count_nonzero(mask_b)) - intersection
    return intersection / union if union else 0.0


def match_objects(previous: Detections, current: Detections) -> dict[int, int]:
    """Pair objects seen on the same frame by two sessions: {current ID: previous ID}.

    Greedy on mask IoU (best pairs first), same prompt only, IoU at least MATCH_IOU.
    """
    pairs = [
        (mask_iou(previous.boxes[i], previous.masks[i], current.boxes[j], current.masks[j]), i, j)
        for i in range(len(previous.object_ids))
        for j in range(len(current.object_ids))
        if previous.prompts[i] == current.prompts[j]
    ]
    matches: dict[int, int] = {}
    used: set[int] = set()
    for iou, i, j in sorted(pairs, key=lambda pair: -pair[0]):
        if iou < MATCH_IOU or i in used or int(current.object_ids[j]) in matches:
            continue
        used.add(i)
        matches[int(current.object_ids[j])] = int(previous.object_ids[i])
    return matches
