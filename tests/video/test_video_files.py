"""MP4 and animated WebP bytes: they decode back, carry their facts, are browser-friendly."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from imagegen_pipeline.storage import Storage
from imagegen_pipeline.video.video_files import (
    mp4_bytes,
    read_mp4_frames,
    read_preview_facts,
    webp_preview_bytes,
)


def frames(count: int, width: int, height: int) -> list[Image.Image]:
    """Smooth moving gradients: compressible like real video, distinct from frame to frame."""
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    moving = []
    for i in range(count):
        rgb = np.stack([xs * 2 + 8 * i, ys * 2 + 4 * i, (xs + ys) + 2 * i], axis=-1)
        moving.append(Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)))
    return moving


def test_mp4_decodes_to_the_same_frames(tmp_path):
    originals = frames(6, 64, 48)
    data = mp4_bytes(originals, fps=7)

    decoded = read_mp4_frames(data)
    assert len(decoded) == 6 and decoded[0].size == (64, 48)
    path = tmp_path / "a.mp4"
    path.write_bytes(data)
    meta = iio.immeta(path, plugin="FFMPEG")
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p") and meta["fps"] == 7
    # Lossy, but close: H.264 at quality 8 keeps the picture.
    error = np.abs(np.asarray(decoded[3], dtype=float) - np.asarray(originals[3], dtype=float))
    assert error.mean() < 8
    # faststart: the index (moov) comes before the media data, so browsers play at once.
    assert 0 <= data.find(b"moov") < data.find(b"mdat")


def test_mp4_is_written_whole_without_temporary_files(tmp_path):
    storage = Storage(tmp_path)
    path = storage.path("clips", "a.mp4")
    storage.write_bytes(path, mp4_bytes(frames(3, 64, 48), fps=7))
    assert [p.name for p in (tmp_path / "clips").iterdir()] == ["a.mp4"]
    assert len(read_mp4_frames((tmp_path / "clips" / "a.mp4").read_bytes())) == 3


def test_odd_sizes_are_cropped_to_even():
    decoded = read_mp4_frames(mp4_bytes(frames(3, 65, 49), fps=7))
    assert len(decoded) == 3 and decoded[0].size == (64, 48)


def test_no_frames_make_no_file():
    with pytest.raises(ValueError):
        mp4_bytes([], fps=7)
    with pytest.raises(ValueError):
        webp_preview_bytes([], fps=7)


def test_preview_is_a_small_looping_animation():
    data = webp_preview_bytes(frames(5, 512, 288), fps=10, max_side=128)
    with Image.open(io.BytesIO(data)) as preview:
        assert preview.format == "WEBP" and preview.is_animated and preview.n_frames == 5
        assert preview.size == (128, 72)
        assert preview.info["loop"] == 0  # loops forever
        preview.seek(1)
        preview.load()
        assert preview.info["duration"] == 100  # milliseconds per frame at 10 fps


def test_preview_carries_the_facts_of_its_clip():
    finished = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    facts = {"run_id": "run-1", "seconds": 1.25, "memory_fallback": None, "finished_at": finished}
    data = webp_preview_bytes(frames(2, 64, 48), fps=7, facts=facts)
    read = read_preview_facts(data)
    assert read["run_id"] == "run-1" and read["seconds"] == 1.25
    assert read["memory_fallback"] is None
    assert datetime.fromisoformat(read["finished_at"]) == finished  # timestamps as text
    assert read_preview_facts(webp_preview_bytes(frames(2, 64, 48), fps=7)) == {}
