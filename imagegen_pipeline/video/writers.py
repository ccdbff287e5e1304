"""Clip files: H.264 MP4 through imageio-ffmpeg's bundled ffmpeg, and animated WebP previews.

Both are written atomically (see ``atomic_files``): a reader or a re-run sees a whole file or
none, so a file's presence means the clip is done.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from PIL import Image

from imagegen_pipeline.atomic_files import atomic_path, write_bytes_atomic

MP4_QUALITY = 8  # imageio's 0-10 scale (10 best); 8 is visually clean at a few hundred kB


def _even_frames(frames: Sequence[Image.Image]) -> np.ndarray:
    """The frames as one uint8 array, cropped to even sides (yuv420p halves the chroma)."""
    stack = np.stack([np.asarray(frame.convert("RGB")) for frame in frames])
    height, width = stack.shape[1:3]
    return stack[:, : height - height % 2, : width - width % 2]


def write_mp4(path: Path, frames: Sequence[Image.Image], fps: int) -> None:
    """Write ``frames`` as an H.264 MP4 (yuv420p, plays in every browser), atomically."""
    if not frames:
        raise ValueError("a clip needs at least one frame")
    stack = _even_frames(frames)
    with atomic_path(path) as temp_path:
        # The temporary name ends in ".tmp", so the container is named for ffmpeg explicitly;
        # faststart puts the index first so browsers play before the whole file arrives.
        iio.imwrite(
            temp_path,
            stack,
            plugin="FFMPEG",
            extension=".mp4",
            fps=fps,
            codec="libx264",
            pixelformat="yuv420p",
            quality=MP4_QUALITY,
            macro_block_size=2,  # sides are already even: never let imageio resize
            output_params=["-f", "mp4", "-movflags", "+faststart"],
            ffmpeg_log_level="error",
        )


def write_preview(path: Path, frames: Sequence[Image.Image], fps: int, max_side: int = 256) -> None:
    """Write a small looping animated WebP of ``frames`` for galleries, atomically."""
    if not frames:
        raise ValueError("a clip needs at least one frame")
    small = []
    for frame in frames:
        frame = frame.convert("RGB")
        frame.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        small.append(frame)
    buffer = io.BytesIO()
    small[0].save(
        buffer,
        format="WEBP",
        save_all=True,
        append_images=small[1:],
        duration=round(1000 / fps),
        loop=0,
        quality=80,
    )
    write_bytes_atomic(path, buffer.getvalue())


def read_mp4_frames(path: Path) -> list[Image.Image]:
    """Every frame of an MP4, decoded by the same bundled ffmpeg."""
    return [Image.fromarray(frame) for frame in iio.imiter(path, plugin="FFMPEG")]
