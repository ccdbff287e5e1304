"""What a video clip is, without torch: the settings in its address, its seed, its result.

The video step plans, skips and records clips with these; only ``svd.py`` needs torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from PIL import Image

from imagegen_pipeline.records import VideoClipStatus

if TYPE_CHECKING:  # svd.py imports this module; the settings are only read here
    from imagegen_pipeline.video.svd import SvdSettings

SEED_MODULUS = 2**31  # int32-safe, like image seeds


@dataclass(frozen=True)
class VideoClipSettings:
    """Everything about the model run that changes a clip's pixels; part of its address."""

    model_id: str
    revision: str
    width: int
    height: int
    frames: int
    steps: int
    fps: int
    motion_bucket_id: int
    noise_aug_strength: float
    min_guidance_scale: float
    max_guidance_scale: float


def video_clip_settings(config: SvdSettings, model_id: str) -> VideoClipSettings:
    """The content-address settings of clips made with ``config`` (resolved: no None left)."""
    return VideoClipSettings(
        model_id=model_id,
        revision=config.revision or "main",
        width=config.width,  # type: ignore[arg-type]
        height=config.height,  # type: ignore[arg-type]
        frames=config.num_frames,  # type: ignore[arg-type]
        steps=config.steps,  # type: ignore[arg-type]
        fps=config.fps,
        motion_bucket_id=config.motion_bucket_id,
        noise_aug_strength=config.noise_aug_strength,
        min_guidance_scale=config.min_guidance_scale,
        max_guidance_scale=config.max_guidance_scale,  # type: ignore[arg-type]
    )


@dataclass
class VideoClipResult:
    """What SVD made of one source image."""

    status: VideoClipStatus
    frames: list[Image.Image] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0
    peak_gpu_memory_mb: float | None = None
    memory_fallback: str | None = None  # the out-of-memory rungs this clip ran under
    started_at: datetime | None = None


def video_clip_seed(source_image_id: str) -> int:
    """The seed of the clip of a source image: a stable hash of the image's content address."""
    digest = hashlib.sha256(f"svd:{source_image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_MODULUS


def video_clip_address(settings: VideoClipSettings, source_image_id: str, seed: int) -> str:
    """A sha256 over every input that changes the clip; equal addresses mean equal work.

    The source enters by its content address, not its bytes: a PNG's bytes also carry the run
    id and times of the run that wrote it, so the same picture made again would otherwise
    orphan every clip of it. A damaged source's clips are moved aside with it instead."""
    key = {**asdict(settings), "source_image_id": source_image_id, "seed": seed}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
