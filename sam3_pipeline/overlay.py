"""What the masks look like: each object's colour, the overlay drawn on a frame, and the preview contact sheet."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from sam3_pipeline.sam3 import Detections

MASK_ALPHA = 0.5
PREVIEW_GRID = (3, 2)  # columns, rows of the contact sheet
PREVIEW_TILE_WIDTH = 480
PREVIEW_JPEG_QUALITY = 85

# tab20-like, reordered so that consecutive IDs get contrasting colours. RGB.
PALETTE = np.array(
    [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (188, 189, 34),
        (23, 190, 207),
        (255, 187, 120),
        (174, 199, 232),
        (152, 223, 138),
        (255, 152, 150),
        (197, 176, 213),
        (196, 156, 148),
        (247, 182, 210),
        (219, 219, 141),
        (158, 218, 229),
        (127, 127, 127),
        (255, 255, 255),
    ],
    dtype=np.uint8,
)


def object_color(object_id: int) -> tuple[int, int, int]:
    """The RGB colour of an object ID; the same ID always gets the same colour."""
    return tuple(int(c) for c in PALETTE[object_id % len(PALETTE)])


def color_hex(color: tuple[int, int, int]) -> str:
    """An RGB colour as CSS writes it: `#1f77b4`."""
    return "#" + "".join(f"{channel:02x}" for channel in color)


def draw_overlay(frame: np.ndarray, detections: Detections) -> np.ndarray:
    """Blend each mask in its object's colour, box it and label it with its prompt.

    The IDs are those of one window's SAM3 session (windows are drawn apart, and joined without
    re-encoding), so the colour tells objects apart within a window and the label says what each
    is; IDs that hold through the whole video are in the tracks, MOT rows and metadata.

    frame: (H, W, 3) uint8 RGB. Returns a new (H, W, 3) uint8 RGB frame.
    Masks are painted largest first so that small objects (the ball) stay visible; each blend is
    done inside the object's box only, which is what keeps this cheap at 20+ objects.
    """
    height = frame.shape[0]
    canvas = frame.copy()
    areas = np.array([np.count_nonzero(mask) for mask in detections.masks])
    for i in np.argsort(-areas, kind="stable"):
        x0, y0, x1, y1 = detections.boxes[i]
        roi = canvas[y0 : y1 + 1, x0 : x1 + 1]
        tint = np.empty_like(roi)
        tint[:] = object_color(int(detections.object_ids[i]))
        blended = cv2.addWeighted(roi, 1.0 - MASK_ALPHA, tint, MASK_ALPHA, 0.0)
        cv2.copyTo(blended, detections.masks[i].view(np.uint8), roi)
    scale = max(height / 720.0, 0.4) * 0.6
    thickness = max(1, round(height / 360))
    for i, obj_id in enumerate(map(int, detections.object_ids)):
        color = object_color(obj_id)
        x0, y0, x1, y1 = map(int, detections.boxes[i])
        cv2.rectangle(canvas, (x0, y0), (x1, y1), color, thickness)
        label = detections.prompts[i]
        (text_w, text_h), baseline = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        top = max(y0 - text_h - baseline - 2, 0)
        cv2.rectangle(canvas, (x0, top), (x0 + text_w + 2, top + text_h + baseline + 2), color, cv2.FILLED)
        cv2.putText(
            canvas,
            label,
            (x0 + 1, top + text_h + 1),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (0, 0, 0),
            thickness,
            cv2.LINE_AA,
        )
    return canvas


def preview_picks(total: int) -> list[int]:
    """The frame numbers the preview shows of a video of `total` frames: evenly spaced, first and
    last included, each once."""
    tiles = PREVIEW_GRID[0] * PREVIEW_GRID[1]
    if total <= 0:
        return []
    return np.unique(np.linspace(0, total - 1, num=min(tiles, total)).round().astype(int)).tolist()


def preview_tile(frame_size: tuple[int, int]) -> tuple[int, int]:
    """(W, H) of one preview tile for frames of frame_size (H, W): PREVIEW_TILE_WIDTH wide, the
    frame's aspect ratio, an even height."""
    height, width = frame_size
    return PREVIEW_TILE_WIDTH, max(2, round(PREVIEW_TILE_WIDTH * height / width / 2) * 2)


def preview_size(frame_size: tuple[int, int]) -> tuple[int, int]:
    """(W, H) of the preview sheet for frames of frame_size (H, W)."""
    tile_w, tile_h = preview_tile(frame_size)
    return PREVIEW_GRID[0] * tile_w, PREVIEW_GRID[1] * tile_h


def preview_jpeg(frames: Sequence[tuple[float, np.ndarray]], frame_size: tuple[int, int]) -> bytes:
    """A contact sheet of (timestamp, (H, W, 3) uint8 RGB frame) pairs, each shrunk to a tile
    PREVIEW_TILE_WIDTH wide and stamped with its time, PREVIEW_GRID tiles in rows; unused tiles
    stay black. frame_size: (H, W). Returns the JPEG file's bytes."""
    tile_w, tile_h = tile_size = preview_tile(frame_size)
    columns, rows = PREVIEW_GRID
    sheet = np.zeros((rows * tile_h, columns * tile_w, 3), dtype=np.uint8)
    for slot, (timestamp, frame) in enumerate(frames[: columns * rows]):
        thumbnail = cv2.resize(frame, tile_size, interpolation=cv2.INTER_AREA)
        cv2.putText(
            thumbnail, f"{timestamp:.1f} s", (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 2, cv2.LINE_AA
        )
        row, column = divmod(slot, columns)
        sheet[row * tile_h : (row + 1) * tile_h, column * tile_w : (column + 1) * tile_w] = thumbnail
    ok, jpeg = cv2.imencode(
        ".jpg", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, PREVIEW_JPEG_QUALITY]
    )
    if not ok:
        raise RuntimeError("JPEG encoding of the preview failed")
    return jpeg.tobytes()
