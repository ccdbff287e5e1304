"""Video clip files: H.264 MP4 through imageio-ffmpeg's bundled ffmpeg, animated WebP previews.

Encoders return bytes, which the storage writes atomically (a whole object or none), so a file's
presence means the clip is done. The preview also carries the generation facts of its clip, so
a re-run can rebuild the metadata row of a clip whose run was killed before flushing it.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
from PIL import Image

MP4_QUALITY = 8  # imageio's 0-10 scale (10 best); 8 is visually clean at a few hundred kB


def _even_frames(frames: Sequence[Image.Image]) -> np.ndarray:
    """The frames as one uint8 array, cropped to even sides (yuv420p halves the chroma)."""
    stack = np.stack([np.asarray(frame.convert("RGB")) for frame in frames])
    height, width = stack.shape[1:3]
    return stack[:, : height - height % 2, : width - width % 2]


def mp4_bytes(frames: Sequence[Image.Image], fps: int) -> bytes:
    """``frames`` as an H.264 MP4 (yuv420p, plays in every browser)."""
    if not frames:
        raise ValueError("a clip needs at least one frame")
    stack = _even_frames(frames)
    with tempfile.TemporaryDirectory(prefix="imagegen-mp4-") as folder:
        path = Path(folder) / "clip.mp4"
        # faststart puts the index first, so browsers play before the whole file arrives.
        iio.imwrite(
            path,
            stack,
            plugin="FFMPEG",
            fps=fps,
            codec="libx264",
            pixelformat="yuv420p",
            quality=MP4_QUALITY,
            macro_block_size=2,  # sides are already even: never let imageio resize
            output_params=["-movflags", "+faststart"],
            ffmpeg_log_level="error",
        )
        return path.read_bytes()


def webp_preview_bytes(
    frames: Sequence[Image.Image],
    fps: int,
    max_side: int = 256,
    facts: Mapping[str, Any] | None = None,
) -> bytes:
    """A small looping animated WebP of ``frames``, with ``facts`` as its XMP packet."""
    if not frames:
        raise ValueError("a clip needs at least one frame")
    small = []
    for frame in frames:
        frame = frame.convert("RGB")
        frame.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        small.append(frame)
    buffer = io.BytesIO()
    extra = {"xmp": json.dumps(facts, default=str).encode()} if facts is not None else {}
    small[0].save(
        buffer,
        format="WEBP",
        save_all=True,
        append_images=small[1:],
        duration=round(1000 / fps),
        loop=0,
        quality=80,
        **extra,
    )
    return buffer.getvalue()


def read_preview_facts(data: bytes) -> dict[str, Any]:
    """The facts :func:`webp_preview_bytes` embedded ({} when there are none)."""
    with Image.open(io.BytesIO(data)) as image:
        packet = image.info.get("xmp")
    if not packet:
        return {}
    return json.loads(packet.decode() if isinstance(packet, bytes) else packet)


def read_mp4_frames(data: bytes) -> list[Image.Image]:
    """Every frame of an MP4's bytes, decoded by the same bundled ffmpeg."""
    with tempfile.TemporaryDirectory(prefix="imagegen-mp4-") as folder:
        path = Path(folder) / "clip.mp4"
        path.write_bytes(data)
        return [Image.fromarray(frame) for frame in iio.imiter(path, plugin="FFMPEG")]
