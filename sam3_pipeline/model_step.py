"""SAM3's step per frame with fewer operations, fewer host waits and a session that stays flat.

Four changes to transformers' own step, each giving the same objects, scores and thresholded
masks (tests/test_model_step.py): the tracker runs its objects in one batch
(`track_objects_together`), the detector runs every prompt in one batch
(`detect_all_prompts_at_once`), the detection-to-track association and the detector's coordinate
grid stop reading values back from the device one at a time (`associate_on_the_host`,
`remember_coords`), and the session drops what no later frame reads (`prune_session`). They reach
into transformers' SAM3 internals, so they are checked against the version they were written for
(`CHECKED_TRANSFORMERS`) and the names they use: on another version, or where a name is missing,
transformers' own step runs and one warning line says so. `--model-step stock` asks for
transformers' own step outright. `bench/model_step.py` measures what they save
(docs/performance.md).
"""

from __future__ import annotations

import functools
import sys
from collections import defaultdict
from typing import Any

import torch

FAST, STOCK = "fast", "stock"
MODEL_STEPS = (FAST, STOCK)
# The transformers releases whose SAM3 code these changes were read against and tested with.
CHECKED_TRANSFORMERS = ("5.24.0",)
# What the changes read or edit in a `Sam3VideoInferenceSession` and the tracker's config.
SESSION_FIELDS = (
    "output_dict_per_obj", "processed_frames", "obj_id_to_tracker_score_frame_wise",
    "frames_tracked_per_obj", "cache",
)  # fmt: skip
TRACKER_CONFIG_FIELDS = ("num_maskmem", "max_object_pointers_in_encoder")
# What the association on the host and the one detector pass read or replace of `Sam3VideoModel`.
MODEL_FIELDS = (
    "_associate_det_trk", "assoc_iou_thresh", "trk_assoc_iou_thresh", "new_det_thresh", "high_conf_thresh",
    "high_iou_thresh", "run_detection", "det_nms_thresh", "score_threshold_detection",
)  # fmt: skip
# The tracker's own steps that the batched one is built from, called as they are.
TRACKER_METHODS = (
    "_prepare_vision_features", "_gather_memory_frame_outputs", "_get_object_pointers",
    "_build_memory_attention_inputs", "_process_object_pointers", "_use_multimask",
    "get_image_wide_positional_embeddings",
)  # fmt: skip

MEMORY_KEYS = ("maskmem_features", "maskmem_pos_enc")  # a memory frame's output, (HW, objects, C) each
_EMPTY_FRAME = torch.empty(0)


def choose_model_step(requested: str, model: Any, transformers_version: str | None = None) -> str:
    """The step to run: `requested`, unless it is FAST and this transformers or this model is not
    the one the changes were checked against; then STOCK, with one warning line on stderr."""
    if requested == STOCK:
        return STOCK
    if transformers_version is None:
        import transformers

        transformers_version = transformers.__version__
    reason = None
    if transformers_version not in CHECKED_TRANSFORMERS:
        checked = ", ".join(CHECKED_TRANSFORMERS)
        reason = f"transformers {transformers_version} is not the version it was checked against ({checked})"
    else:
        from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

        tracker = getattr(model, "tracker_model", None)
        config = getattr(tracker, "config", None)
        missing = [name for name in TRACKER_CONFIG_FIELDS if not hasattr(config, name)]
        missing += [name for name in TRACKER_METHODS if not hasattr(tracker, name)]
        missing += [name for name in MODEL_FIELDS if not hasattr(model, name)]
        decoder = getattr(getattr(model, "detector_model", None), "detr_decoder", None)
        missing += [] if hasattr(decoder, "_get_coords") else ["detector_model.detr_decoder._get_coords"]
        missing += [name for name in SESSION_FIELDS if not hasattr(Sam3VideoInferenceSession(), name)]
        if missing:
            reason = f"SAM3 lacks {', '.join(missing)}"
    if reason:
        print(f"warning: SAM3 runs transformers' own step per frame: {reason}", file=sys.stderr)
        return STOCK
    return FAST


def apply_model_step(requested: str, model: Any) -> str:
    """Set `model` (a `Sam3VideoModel`) up for the step `choose_model_step` picks; returns that step.
    FAST replaces its tracker's `forward` on this instance only: other models keep transformers' own."""
    step = choose_model_step(requested, model)
    if step == FAST:
        tracker = model.tracker_model
        tracker.forward = functools.partial(track_objects_together, tracker, tracker.forward)
        model._associate_det_trk = functools.partial(associate_on_the_host, model)
        decoder = model.detector_model.detr_decoder
        decoder._get_coords = remember_coords(decoder._get_coords)
        model.run_detection = functools.partial(detect_all_prompts_at_once, model)
    return step


def can_track_together(tracker: Any, session: Any, frame_idx: int, frame: Any, run_mem_encoder: bool) -> bool:
    """Whether every object only propagates on this frame: none has a new input or a conditioning
    output here (the frame where SAM3 adds or re-conditions an object runs transformers' own loop),
    and the caller encodes memories itself, as `Sam3VideoModel`'s propagation does."""
    count = session.get_obj_num()
    return (
        frame is None
        and not run_mem_encoder
        and count > 1
        and tracker.num_maskmem > 0
        and all(
            session.obj_idx_to_id(obj_idx) not in session.obj_with_new_inputs
            and frame_idx not in session.output_dict_per_obj[obj_idx]["cond_frame_outputs"]
            and session.output_dict_per_obj[obj_idx]["cond_frame_outputs"]
            for obj_idx in range(count)
        )
    )


@torch.inference_mode()
def track_objects_together(
    tracker: Any,
    stock_forward: Any,
    inference_session: Any,
    frame_idx: int | None = None,
    frame: torch.Tensor | None = None,
    reverse: bool = False,
    run_mem_encoder: bool = True,
    **kwargs: Any,
) -> Any:
    """`Sam3TrackerVideoModel.forward` with the objects in one batch rather than one by one.

    transformers runs memory attention and the mask heads once per object, each at batch 1, and
    recomputes the prompt encoding and positional embedding each time, which are the same for
    every object (433 operations an object a frame at full depth). Here the objects whose memory
    has the same layout (the same memory frames present and the same pointer offsets: on a
    propagation frame, nearly always all of them) go through them in one pass, as
    facebookresearch/sam3 does. Each object's memory and pointers are its own, gathered by
    transformers' own methods; results are stored exactly where its loop stores them.
    """
    from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoSegmentationOutput

    session = inference_session
    if not can_track_together(tracker, session, frame_idx, frame, run_mem_encoder):
        return stock_forward(
            inference_session=session, frame_idx=frame_idx, frame=frame, reverse=reverse,
            run_mem_encoder=run_mem_encoder, **kwargs,
        )  # fmt: skip
    count = session.get_obj_num()
    features, positions = tracker._prepare_vision_features(session, frame_idx, 1)
    device = features[-1].device
    groups: dict[tuple, list[tuple[int, list, list]]] = defaultdict(list)
    for obj_idx in range(count):
        memory = tracker._gather_memory_frame_outputs(session, obj_idx, frame_idx, reverse)
        offsets, pointers, most_pointers = tracker._get_object_pointers(
            session, obj_idx, frame_idx, session.num_frames, device, reverse, False
        )
        layout = (tuple((offset, output is not None) for offset, output in memory), tuple(offsets), most_pointers)
        groups[layout].append((obj_idx, memory, pointers))
    high_res = [
        x.permute(1, 2, 0).view(x.size(1), x.size(2), *size)
        for x, size in zip(features[:-1], tracker.backbone_feature_sizes[:-1])
    ]
    multimask = tracker._use_multimask(False, None)
    masks: list[torch.Tensor | None] = [None] * count
    scores: list[torch.Tensor | None] = [None] * count
    for (_, offsets, most_pointers), members in groups.items():
        batch = len(members)
        conditioned = memory_conditioned_features(
            tracker, session, members, list(offsets), most_pointers, features[-1], positions[-1]
        )
        heads = mask_heads(tracker, conditioned, [x.expand(batch, -1, -1, -1) for x in high_res], multimask)
        for row, (obj_idx, _, _) in enumerate(members):
            output = {name: value[row : row + 1] for name, value in heads.items()}
            session.store_output(obj_idx, frame_idx, output_value=output, is_conditioning_frame=False)
            session.frames_tracked_per_obj[obj_idx][frame_idx] = {"reverse": reverse}
            masks[obj_idx] = output["pred_masks"]
            scores[obj_idx] = output["object_score_logits"].squeeze(-1)
    return Sam3TrackerVideoSegmentationOutput(
        object_ids=session.obj_ids.copy(),
        pred_masks=torch.cat(masks, dim=0),
        object_score_logits=torch.cat(scores, dim=0),
        frame_idx=frame_idx,
    )


def memory_conditioned_features(
    tracker: Any,
    session: Any,
    members: list[tuple[int, list, list]],
    offsets: list[int],
    most_pointers: int,
    features: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """The frame's features after memory attention, for a batch of objects with the same memory
    layout: (B, C, H, W). `features`, `positions`: (HW, 1, C). What
    `_prepare_memory_conditioned_features` computes per object, with each object's memory frames
    and pointers stacked along the batch."""
    batch, device = len(members), features.device
    stacked_frames = []
    for position, (offset, first) in enumerate(members[0][1]):
        if first is None:
            stacked_frames.append((offset, None))
            continue
        outputs = [memory[position][1] for _, memory, _ in members]
        stacked = {key: torch.cat([output[key] for output in outputs], dim=1) for key in MEMORY_KEYS}
        stacked_frames.append((offset, stacked))
    memories, memory_positions = tracker._build_memory_attention_inputs(stacked_frames, device)
    pointer_tokens = 0
    if members[0][2]:
        stacked_pointers = [torch.cat(tokens, dim=0) for tokens in zip(*(pointers for _, _, pointers in members))]
        pointers, pointer_positions = tracker._process_object_pointers(
            offsets, stacked_pointers, most_pointers, batch, tracker.hidden_dim, device
        )
        memories.append(pointers)
        memory_positions.append(pointer_positions)
        pointer_tokens = pointers.shape[0]
    conditioned = tracker.memory_attention(
        current_vision_features=features.expand(-1, batch, -1),
        current_vision_position_embeddings=positions.expand(-1, batch, -1),
        memory=torch.cat(memories, dim=0).to(dtype=session.dtype),
        memory_posision_embeddings=torch.cat(memory_positions, dim=0),
        num_object_pointer_tokens=pointer_tokens,
    )
    height, width = tracker.backbone_feature_sizes[-1]
    # (1, B, HW, C) -> (B, C, H, W)
    return conditioned[0].transpose(1, 2).reshape(batch, tracker.hidden_dim, height, width)


def mask_heads(
    tracker: Any, conditioned: torch.Tensor, high_res: list[torch.Tensor], multimask: bool
) -> dict[str, torch.Tensor]:
    """The tracker's prompt encoder, mask decoder and object pointer for B objects without point,
    box or mask inputs: what `_single_frame_forward` computes for one, which at batch B would pick
    each object's best mask with indices that broadcast to (B, B). `conditioned`: (B, C, H, W);
    `high_res`: its higher-resolution features, each (B, C', H', W'). Returns, each with B rows:
    pred_masks (B, 1, h, w), high_res_masks (B, 1, S, S), object_pointer (B, 1, C) and
    object_score_logits (B, 1, 1), as the loop stores them."""
    from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import NO_OBJ_SCORE

    batch, device, dtype = conditioned.shape[0], conditioned.device, conditioned.dtype
    no_points = torch.zeros(batch, 1, 1, 2, dtype=dtype, device=device)
    no_labels = -torch.ones(batch, 1, 1, dtype=torch.int32, device=device)
    sparse, dense = tracker.prompt_encoder(
        input_points=no_points, input_labels=no_labels, input_boxes=None, input_masks=None
    )
    low_res_multimasks, iou_scores, output_tokens, object_score_logits = tracker.mask_decoder(
        image_embeddings=conditioned,
        image_positional_embeddings=tracker.get_image_wide_positional_embeddings().repeat(batch, 1, 1, 1),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
        high_resolution_features=high_res,
    )
    appearing = object_score_logits > 0
    low_res_multimasks = torch.where(appearing[:, None, None], low_res_multimasks, NO_OBJ_SCORE)
    high_res_multimasks = (
        torch.nn.functional.interpolate(
            low_res_multimasks.squeeze(1).float(),
            size=(tracker.image_size, tracker.image_size),
            mode="bilinear",
            align_corners=False,
        )
        .unsqueeze(1)
        .to(low_res_multimasks.dtype)
    )
    output_token = output_tokens[:, :, 0]
    if multimask:
        best = torch.argmax(iou_scores, dim=-1)  # (B, 1)
        rows, first = torch.arange(batch, device=device)[:, None], torch.zeros_like(best)
        low_res_masks, high_res_masks = low_res_multimasks[rows, first, best], high_res_multimasks[rows, first, best]
        if output_tokens.size(2) > 1:
            output_token = output_tokens[rows, first, best]
    else:
        low_res_masks, high_res_masks = low_res_multimasks[:, :, 0], high_res_multimasks[:, :, 0]
    pointer = tracker.object_pointer_proj(output_token)
    weight = appearing.to(pointer.dtype)
    pointer = weight * pointer + (1 - weight) * tracker.no_object_pointer
    return {
        "pred_masks": low_res_masks,
        "object_pointer": pointer,
        "high_res_masks": high_res_masks,
        "object_score_logits": object_score_logits,
    }


def detect_all_prompts_at_once(
    model: Any, inference_session: Any, vision_embeds: Any
) -> dict[int, dict[str, torch.Tensor]]:
    """`Sam3VideoModel.run_detection` with every prompt in one batch through the detector.

    transformers runs the detector (DETR encoder and decoder, mask decoder: 1,020 operations at
    full depth) once per prompt on the same frame's features. Here the prompts' text embeddings
    (all padded to the same 32 tokens) go through it together against the frame's features
    repeated per prompt; each prompt's detections are then picked exactly as transformers picks
    them. Returns {prompt ID: {"bbox", "mask", "scores"}}, as transformers' does.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.models.sam3_video.modeling_sam3_video import nms_masks

    session = inference_session
    prompt_ids = list(session.prompts.keys())
    if len(prompt_ids) < 2:
        return type(model).run_detection(model, session, vision_embeds)
    for prompt_id in prompt_ids:
        if prompt_id not in session.prompt_embeddings:
            session.prompt_embeddings[prompt_id] = model.detector_model.get_text_features(
                input_ids=session.prompt_input_ids[prompt_id],
                attention_mask=session.prompt_attention_masks[prompt_id],
                return_dict=True,
            )
    texts = [session.prompt_embeddings[prompt_id] for prompt_id in prompt_ids]
    count = len(prompt_ids)
    repeated = type(vision_embeds)(
        last_hidden_state=vision_embeds.last_hidden_state.expand(count, *vision_embeds.last_hidden_state.shape[1:]),
        fpn_hidden_states=tuple(x.expand(count, *x.shape[1:]) for x in vision_embeds.fpn_hidden_states),
        fpn_position_encoding=tuple(x.expand(count, *x.shape[1:]) for x in vision_embeds.fpn_position_encoding),
    )
    outputs = model.detector_model(
        vision_embeds=repeated,
        text_embeds=BaseModelOutputWithPooling(pooler_output=torch.cat([text.pooler_output for text in texts])),
        attention_mask=torch.cat([session.prompt_attention_masks[prompt_id] for prompt_id in prompt_ids]),
    )
    all_probs = outputs.pred_logits.sigmoid() * outputs.presence_logits.sigmoid()
    detections = {}
    for row, prompt_id in enumerate(prompt_ids):
        probs, masks = all_probs[row : row + 1], outputs.pred_masks[row : row + 1]
        if model.det_nms_thresh > 0.0:
            keep = nms_masks(
                pred_probs=probs[0],
                pred_masks=masks[0],
                prob_threshold=model.score_threshold_detection,
                iou_threshold=model.det_nms_thresh,
            )
            probs[0][~keep] = 0.0
        kept = torch.where(probs > model.score_threshold_detection)
        detections[prompt_id] = {
            "bbox": outputs.pred_boxes[row : row + 1][kept[0], kept[1]],
            "mask": masks[kept[0], kept[1]],
            "scores": probs[kept[0], kept[1]],
        }
    return detections


def associate_on_the_host(
    model: Any,
    det_masks: torch.Tensor,
    det_scores: torch.Tensor,
    trk_masks: torch.Tensor,
    trk_obj_ids: list[int],
    det_prompt_ids: torch.Tensor,
    trk_prompt_ids: torch.Tensor,
) -> tuple[list[int], list[int], dict[int, list[int]], dict[int, int], list[int]]:
    """`Sam3VideoModel._associate_det_trk` with one copy to the host instead of one per detection.

    Every comparison runs on the device as transformers runs it, in the masks' own precision; the
    results (booleans and the best track of each detection) come to the host in one transfer, and
    the lists and dicts are built from them there, in transformers' order, as
    facebookresearch/sam3 does. Returns what transformers' returns: new detections' indices,
    unmatched and empty tracks' IDs, each detection's matched track IDs, and each track's
    high-confidence detection.
    """
    from transformers.models.sam3_video.modeling_sam3_video import mask_iou

    if trk_masks.size(0) == 0 or det_masks.size(0) == 0:
        return type(model)._associate_det_trk(
            model, det_masks, det_scores, trk_masks, trk_obj_ids, det_prompt_ids, trk_prompt_ids
        )
    ious = mask_iou(det_masks > 0, trk_masks > 0)  # (N, M)
    ious = torch.where(det_prompt_ids.unsqueeze(1) == trk_prompt_ids.unsqueeze(0), ious, torch.zeros_like(ious))
    trk_is_nonempty = (trk_masks > 0).any(dim=(1, 2))  # (M,)
    trk_is_unmatched = trk_is_nonempty & ~(ious >= model.trk_assoc_iou_thresh).any(dim=0)
    matches = ious >= model.assoc_iou_thresh  # (N, M)
    is_new = (det_scores >= model.new_det_thresh) & ~matches.any(dim=1)  # (N,)
    is_high = (det_scores >= model.high_conf_thresh) & ~is_new & (ious.max(dim=1)[0] >= model.high_iou_thresh)
    best_track = ious.argmax(dim=1)  # (N,)
    count, tracks = matches.shape
    flags = (matches, trk_is_unmatched, trk_is_nonempty, is_new, is_high)
    on_host = torch.cat([part.flatten().long() for part in flags] + [best_track]).tolist()
    matches_of = [on_host[row * tracks : (row + 1) * tracks] for row in range(count)]
    at = count * tracks
    unmatched, nonempty = on_host[at : at + tracks], on_host[at + tracks : at + 2 * tracks]
    at += 2 * tracks
    new, high, best = on_host[at : at + count], on_host[at + count : at + 2 * count], on_host[at + 2 * count :]
    det_to_matched = {row: [trk_obj_ids[t] for t in range(tracks) if matches_of[row][t]] for row in range(count)}
    high_conf_det = {}
    for row in range(count):
        if high[row]:
            high_conf_det[trk_obj_ids[best[row]]] = row
    return (
        [row for row in range(count) if new[row]],
        [trk_obj_ids[t] for t in range(tracks) if unmatched[t]],
        det_to_matched,
        high_conf_det,
        [trk_obj_ids[t] for t in range(tracks) if not nonempty[t]],
    )


def remember_coords(stock_get_coords: Any) -> Any:
    """`Sam3DetrDecoder._get_coords`, computed once per dtype and device.

    transformers caches it with an LRU cache keyed on the grid's height and width, which arrive as
    fresh 0-d tensors on every call, so it never hits, and `arange` up to a tensor reads its value
    back from the device: a host wait per decoder layer per prompt. The grid is the same on every
    call (the processor resizes every frame to the model's input size), so the first result serves.
    """
    remembered: dict[tuple[torch.dtype, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def get_coords(height: torch.Tensor, width: torch.Tensor, dtype: torch.dtype, device: Any) -> Any:
        key = (dtype, str(device))
        if key not in remembered:
            remembered[key] = stock_get_coords(height, width, dtype=dtype, device=device)
        return remembered[key]

    return get_coords


def frames_read_back(model: Any) -> int:
    """How many frames before the current one SAM3's tracker reads: the memory bank's frames
    (num_maskmem - 1) and the object pointers' (max_object_pointers_in_encoder - 1)."""
    config = model.tracker_model.config
    return max(config.num_maskmem - 1, config.max_object_pointers_in_encoder - 1)


def prune_session(session: Any, frame_idx: int, read_back: int) -> None:
    """Drop from a streaming session what no later frame reads, after frame `frame_idx` ran.

    transformers keeps every frame's input and every object's outputs for the whole session
    (about 74 MB a frame at 20 objects, full size). A later frame reads only: the conditioning
    frames' outputs (kept), the last `read_back` frames' memory features and object pointers,
    and how many frames there were (`num_frames` is the count of `processed_frames`' keys, and
    caps the object pointers read: so the keys stay, each with an empty tensor). Each frame's
    three upsampled candidate masks (`high_res_masks`) are read by the memory encoder of that
    same frame only.
    """
    oldest_kept = frame_idx - read_back
    for outputs in session.output_dict_per_obj.values():
        for storage in ("cond_frame_outputs", "non_cond_frame_outputs"):
            current = outputs[storage].get(frame_idx)
            if current is not None:
                current.pop("high_res_masks", None)
        stale = [index for index in outputs["non_cond_frame_outputs"] if index < oldest_kept]
        for index in stale:
            del outputs["non_cond_frame_outputs"][index]
    frames = session.processed_frames
    for index in [index for index in frames if index < frame_idx and frames[index].numel()]:
        frames[index] = _EMPTY_FRAME
    # Copied whole on every frame (deepcopy in the update planning); only the current frame's is read.
    scores = session.obj_id_to_tracker_score_frame_wise
    for index in [index for index in scores if index < frame_idx]:
        del scores[index]
