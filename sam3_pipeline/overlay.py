"""What the masks look like: each object's colour, the overlay drawn on a frame, and the preview contact sheet."""

from __future__ import annotations

import dataclasses
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


def place_labels(
    boxes: np.ndarray, label_sizes: Sequence[tuple[int, int]], frame_size: tuple[int, int]
) -> list[tuple[int, int]]:
    """Where each label goes, as (x, y) of its top-left corner, so that no two labels overlap
    while the frame has room: crowded boxes (a corner kick) would otherwise stack their labels
    into one unreadable smear.

    boxes: (N, 4) XYXY inclusive; label_sizes: N (width, height) of the label rectangles;
    frame_size: (H, W). Labels are placed top to bottom of their boxes; each takes the first
    free spot of: just above its box, just below it, inside its top edge, then further down in
    steps of its own height. Where none is free, it goes above its box, overlapping.
    """
    height, width = frame_size
    placed: list[tuple[int, int, int, int]] = []  # x0, y0, x1, y1 exclusive
    spots: list[tuple[int, int]] = [(0, 0)] * len(boxes)
    for i in sorted(range(len(boxes)), key=lambda i: (int(boxes[i][1]), int(boxes[i][0]))):
        x0, y0, _, y1 = map(int, boxes[i])
        w, h = label_sizes[i]
        x = min(max(x0, 0), max(width - w, 0))
        candidates = [y0 - h, y1 + 1, y0, *range(y0 + h, height - h + 1, h)]
        fits = [min(max(y, 0), max(height - h, 0)) for y in candidates]
        free = (y for y in fits if all(x + w <= a or b <= x or y + h <= c or d <= y for a, c, b, d in placed))
        y = next(free, fits[0])
        placed.append((x, y, x + w, y + h))
        spots[i] = (x, y)
    return spots


@dataclasses.dataclass(frozen=True)
class Label:
    """One object's label on a frame: its text in a filled rectangle of the object's colour."""

    text: str
    x: int  # top-left corner of the rectangle, pixels
    y: int
    width: int
    height: int
    text_height: int  # of the glyphs above the baseline


def label_font(frame_height: int) -> tuple[float, int]:
    """(font scale, line thickness) for boxes and labels: the same share of any frame's height."""
    return max(frame_height / 720.0, 0.4) * 0.6, max(1, round(frame_height / 360))


def layout_labels(detections: Detections, frame_size: tuple[int, int]) -> list[Label]:
    """Each object's label, its prompt, placed apart from the others (`place_labels`).
    frame_size: (H, W)."""
    scale, thickness = label_font(frame_size[0])
    texts = list(detections.prompts)
    metrics = [cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness) for text in texts]
    sizes = [(text_w + 2, text_h + baseline + 2) for (text_w, text_h), baseline in metrics]
    spots = place_labels(detections.boxes, sizes, frame_size)
    return [
        Label(text, x, y, w, h, text_h)
        for text, (x, y), (w, h), ((_, text_h), _) in zip(texts, spots, sizes, metrics, strict=True)
    ]


def draw_overlay(frame: np.ndarray, detections: Detections) -> np.ndarray:
    """Blend each mask in its object's colour, box it and label it with its prompt.

    The IDs are those of one window's SAM3 session (windows are drawn apart, and joined without
    re-encoding), so the colour tells objects apart within a window and the label says what each
    is; IDs that hold through the whole video are in the tracks, MOT rows and metadata.

    frame: (H, W, 3) uint8 RGB. Returns a new (H, W, 3) uint8 RGB frame.
    Masks are painted largest first so that small objects (the ball) stay visible; each blend is
    done inside the object's box only, which is what keeps this cheap at 20+ objects. Labels
    come last, over every mask, placed apart (`layout_labels`).
    """
    canvas = frame.copy()
    areas = np.array([np.count_nonzero(mask) for mask in detections.masks])
    for i in np.argsort(-areas, kind="stable"):
        x0, y0, x1, y1 = detections.boxes[i]
        roi = canvas[y0 : y1 + 1, x0 : x1 + 1]
        tint = np.empty_like(roi)
        tint[:] = object_color(int(detections.object_ids[i]))
        blended = cv2.addWeighted(roi, 1.0 - MASK_ALPHA, tint, MASK_ALPHA, 0.0)
        cv2.copyTo(blended, detections.masks[i].view(np.uint8), roi)
    scale, thickness = label_font(frame.shape[0])
    for obj_id, (x0, y0, x1, y1) in zip(map(int, detections.object_ids), detections.boxes.tolist()):
        cv2.rectangle(canvas, (x0, y0), (x1, y1), object_color(obj_id), thickness)
    for obj_id, label in zip(map(int, detections.object_ids), layout_labels(detections, frame.shape[:2])):
        corner = (label.x + label.width - 1, label.y + label.height - 1)
        cv2.rectangle(canvas, (label.x, label.y), corner, object_color(obj_id), cv2.FILLED)
        origin = (label.x + 1, label.y + label.text_height + 1)
        cv2.putText(canvas, label.text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness, cv2.LINE_AA)
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
