"""`sam3_pipeline.tracks.read_tracks`, the reader the README's example uses, on a real run's tracks file."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from pycocotools import mask as coco_mask

import process_segmentation as ps
from conftest import REPO, segment, write_test_video
from sam3_pipeline.tracks import read_tracks


@pytest.fixture(scope="module")
def tracks_file(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("tracks")
    video = write_test_video(folder / "match.mp4", seconds=4, fps=5, size=(160, 96))
    assert ps.main(segment([video], folder / "out", tiny_model_dir, "--chunk-frames", "3")) == 0
    return folder / "out" / "match" / "match_tracks.jsonl"


def test_frames_come_in_order_with_the_objects_and_masks_the_file_holds(tracks_file):
    lines = [json.loads(line) for line in tracks_file.read_text().splitlines()]
    frames = list(read_tracks(tracks_file))
    assert [frame.frame for frame in frames] == list(range(len(lines))) and len(frames) == 4
    assert [frame.timestamp for frame in frames] == [line["timestamp"] for line in lines]
    objects = [(frame, obj) for frame in frames for obj in frame.objects]
    assert objects, "the tiny model reports objects on these frames"
    for frame, obj in objects:
        [listed] = [o for o in lines[frame.frame]["objects"] if o["id"] == obj.id]
        full = obj.mask()
        assert full.dtype == bool and full.shape == (96, 160)
        expected = coco_mask.decode({"size": listed["mask"]["size"], "counts": listed["mask"]["counts"].encode()})
        assert np.array_equal(full, expected.astype(bool))
        assert full.sum() == obj.area == listed["area"]
        x0, y0, x1, y1 = obj.box
        rows, columns = np.nonzero(full)
        assert (columns.min(), rows.min(), columns.max(), rows.max()) == (x0, y0, x1, y1), "the tight box"
        assert np.array_equal(obj.box_mask(), full[y0 : y1 + 1, x0 : x1 + 1])


def test_a_line_that_is_not_a_tracks_line_names_the_file_and_line(tmp_path, tracks_file):
    broken = tmp_path / "broken_tracks.jsonl"
    first = tracks_file.read_text().splitlines()[0]
    broken.write_text(first + "\n" + '{"frame": 1}\n')
    frames = read_tracks(broken)
    assert next(frames).frame == 0, "the good line before it is read"
    with pytest.raises(ValueError, match=rf"^{broken}:2: not a line of a tracks file"):
        next(frames)


def test_the_reader_needs_no_pytorch(tracks_file):
    code = (
        f"import sys; from sam3_pipeline.tracks import read_tracks; list(read_tracks({str(tracks_file)!r})); "
        "print('torch' in sys.modules)"
    )
    shown = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout.strip() == "False", shown.stderr
