"""Frames reach SAM3 and the outputs upright, as a player shows them (the display matrix applied)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest

from sam3_pipeline.video_io import DecodeReport, display_rotation, sample_frames

SIZE = (48, 80)  # stored (H, W): landscape, so a quarter turn shows as portrait


def marked_frame() -> np.ndarray:
    """(H, W, 3) uint8 RGB that no rotation or mirror maps onto itself: a colour gradient with a
    white block in the top-left corner."""
    height, width = SIZE
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    frame[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    frame[..., 1] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    frame[:12, :16] = 255
    return frame


def write_oriented(path: Path, degrees: int, hflip: bool) -> Path:
    """A short H.264 MP4 of `marked_frame` whose display matrix says: turn `degrees`
    counter-clockwise, then mirror left-right when `hflip` (PyAV's writer helper)."""
    height, width = SIZE
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=10, options={"qp": "0"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"
        stream.set_display_rotation(degrees, hflip=hflip)
        for index in range(3):
            frame = av.VideoFrame.from_ndarray(marked_frame(), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def first_sample(path: Path) -> tuple[np.ndarray, DecodeReport]:
    report = DecodeReport()
    with av.open(str(path)) as container:
        sample = next(sample_frames(container, sample_fps=0, max_frames=1, report=report))
    return sample.rgb, report


ORIENTATIONS = [(degrees, hflip) for hflip in (False, True) for degrees in (0, 90, 180, 270)]


@pytest.mark.parametrize(("degrees", "hflip"), ORIENTATIONS, ids=[f"{d}{'-mirrored' if h else ''}" for d, h in ORIENTATIONS])
def test_frames_are_turned_as_the_display_matrix_says(tmp_path, degrees, hflip):
    video = write_oriented(tmp_path / "clip.mp4", degrees, hflip)
    rgb, report = first_sample(video)
    expected = np.rot90(marked_frame(), k=degrees // 90)
    if hflip:
        expected = expected[:, ::-1]
    assert rgb.shape == expected.shape and rgb.flags.c_contiguous
    assert np.abs(rgb.astype(int) - expected).mean() < 3
    assert display_rotation(report.transform) == (degrees, hflip)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs Debian's ffmpeg (installed by .ci/run)")
@pytest.mark.parametrize("rotate_tag", [90, 180, 270])
def test_phone_rotation_tag_matches_ffmpeg_autorotate(tmp_path, rotate_tag):
    """The way phone clips come: a `rotate` tag set by stream copy; ffmpeg's own CLI, which
    rotates by default, is the reference for what a player shows."""
    landscape = write_oriented(tmp_path / "landscape.mp4", 0, False)
    phone = tmp_path / "phone.mp4"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(landscape), "-c", "copy", "-metadata:s:v:0", f"rotate={rotate_tag}", str(phone)],
        check=True,
    )
    probe = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "stream=width,height",
         "-of", "csv=p=0", str(phone)],
        check=True, capture_output=True, text=True,
    )
    raw = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(phone), "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        check=True, capture_output=True,
    ).stdout
    rgb, report = first_sample(phone)
    assert len(raw) == rgb.size, f"ffmpeg shows a different size ({probe.stdout.strip()} stored)"
    reference = np.frombuffer(raw, dtype=np.uint8).reshape(rgb.shape)
    assert np.abs(rgb.astype(int) - reference).mean() < 3
    turned = 0 if rotate_tag == 180 else 1
    assert rgb.shape[:2] == (SIZE[::-1] if turned else SIZE)
    rotation, mirrored = display_rotation(report.transform)
    assert (rotation, mirrored) == (rotate_tag, False)  # what ffprobe reports as the stream's rotation


def test_odd_angle_display_matrix_is_ignored(tmp_path):
    """A rotation by other than a multiple of 90 degrees: left as stored, as most players do."""
    video = write_oriented(tmp_path / "clip.mp4", 45, False)
    rgb, report = first_sample(video)
    assert np.abs(rgb.astype(int) - marked_frame()).mean() < 3
    assert display_rotation(report.transform) == (0, False)
