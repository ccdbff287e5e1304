"""MP4 and animated WebP files: they decode back, atomically written, browser-friendly."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from imagegen_pipeline.video.writers import read_mp4_frames, write_mp4, write_preview


def frames(count: int, width: int, height: int) -> list[Image.Image]:
    """Smooth moving gradients: compressible like real video, distinct from frame to frame."""
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    moving = []
    for i in range(count):
        rgb = np.stack([xs * 2 + 8 * i, ys * 2 + 4 * i, (xs + ys) + 2 * i], axis=-1)
        moving.append(Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)))
    return moving


def test_mp4_decodes_to_the_same_frames(tmp_path):
    path = tmp_path / "clips" / "a.mp4"
    originals = frames(6, 64, 48)
    write_mp4(path, originals, fps=7)

    decoded = read_mp4_frames(path)
    assert len(decoded) == 6 and decoded[0].size == (64, 48)
    meta = iio.immeta(path, plugin="FFMPEG")
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p") and meta["fps"] == 7
    # Lossy, but close: H.264 at quality 8 keeps the picture.
    error = np.abs(np.asarray(decoded[3], dtype=float) - np.asarray(originals[3], dtype=float))
    assert error.mean() < 8
    assert [p.name for p in path.parent.iterdir()] == ["a.mp4"]  # no temporary file left


def test_odd_sizes_are_cropped_to_even(tmp_path):
    path = tmp_path / "odd.mp4"
    write_mp4(path, frames(3, 65, 49), fps=7)
    decoded = read_mp4_frames(path)
    assert len(decoded) == 3 and decoded[0].size == (64, 48)


def test_no_frames_writes_nothing(tmp_path):
    with pytest.raises(ValueError):
        write_mp4(tmp_path / "empty.mp4", [], fps=7)
    assert list(tmp_path.iterdir()) == []


def test_preview_is_a_small_looping_animation(tmp_path):
    path = tmp_path / "a.webp"
    write_preview(path, frames(5, 512, 288), fps=10, max_side=128)
    with Image.open(path) as preview:
        assert preview.format == "WEBP" and preview.is_animated and preview.n_frames == 5
        assert preview.size == (128, 72)
        assert preview.info["loop"] == 0  # loops forever
        preview.seek(1)
        preview.load()
        assert preview.info["duration"] == 100  # milliseconds per frame at 10 fps
