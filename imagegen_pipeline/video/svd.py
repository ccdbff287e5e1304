"""Stable Video Diffusion: a short clip from one still image, without Dagster.

The model is loaded once per step and called once per clip. Every clip has its own CPU
generator seeded from the source image's id, so a clip can be made again alone, on any device.
CUDA out-of-memory errors walk down a ladder of cheaper settings before a clip fails; the rung a
clip needed is recorded with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from diffusers import StableVideoDiffusionPipeline
from PIL import Image, ImageOps

from imagegen_pipeline.backends.base import SEED_MODULUS
from imagegen_pipeline.backends.diffusers_backend import (
    Offload,
    free_accelerator_memory,
    is_out_of_memory,
    load_diffusers_pipeline,
    place_pipeline,
    resolve_device,
    resolve_dtype,
)

logger = logging.getLogger(__name__)

SVD_XT = "stabilityai/stable-video-diffusion-img2vid-xt"


@dataclass
class SvdConfig:
    """How SVD loads and runs; the defaults are the img2vid-xt model card's."""

    model: str = SVD_XT  # hub repo id or local folder in the diffusers layout
    revision: str | None = None  # branch, tag or commit of a hub repo; None for "main"
    device: str = "auto"  # "auto" picks CUDA when present, else the CPU
    dtype: str = "auto"  # "auto": float16 on a GPU, float32 on the CPU
    width: int = 1024  # conditioning image and clip size; multiples of 8
    height: int = 576
    num_frames: int = 25  # XT was trained on 25 frames (the base model on 14)
    steps: int = 25  # denoising steps
    fps: int = 7  # frame rate the model is conditioned on and the MP4 plays at
    motion_bucket_id: int = 127  # more motion above, less below
    noise_aug_strength: float = 0.02  # noise added to the conditioning image
    min_guidance_scale: float = 1.0  # guidance rises linearly from min to max over the frames
    max_guidance_scale: float = 3.0
    decode_chunk_size: int = 8  # frames the VAE decodes at once: less is less peak memory
    forward_chunking: bool = False  # UNet feed-forward in chunks: less memory, a bit slower
    offload: Offload = "none"  # CPU offload: "model" (per sub-model) or "sequential" (per layer)
    allow_download: bool = False  # steps load local files only unless this is set

    def __post_init__(self) -> None:
        if self.width % 8 or self.height % 8 or min(self.width, self.height) < 64:
            raise ValueError(
                f"SVD needs a width and height of at least 64 that are multiples of 8, "
                f"not {self.width}x{self.height}"
            )
        for name in ("num_frames", "steps", "fps", "decode_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")


@dataclass(frozen=True)
class ClipSettings:
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


@dataclass
class ClipResult:
    """What SVD made of one source image."""

    status: Literal["ok", "failed"]
    frames: list[Image.Image] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0
    peak_gpu_memory_mb: float | None = None
    memory_fallback: str | None = None  # the out-of-memory rungs this clip ran under


def clip_seed(source_image_id: str) -> int:
    """The seed of the clip of a source image: a stable hash of the image's content address."""
    digest = hashlib.sha256(f"svd:{source_image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_MODULUS


def clip_address(
    settings: ClipSettings, source_sha256: str, source_image_id: str, seed: int
) -> str:
    """A sha256 over every input that changes the clip; equal addresses mean equal work."""
    key = {
        **asdict(settings),
        "source_sha256": source_sha256,
        "source_image_id": source_image_id,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def conditioning_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` scaled to cover ``width`` x ``height`` and centre-cropped to it."""
    return ImageOps.fit(image.convert("RGB"), (width, height), Image.Resampling.LANCZOS)


class SvdGenerator:
    """StableVideoDiffusionPipeline, loaded once, called once per clip."""

    preferred_dtype = torch.float16
    variant = "fp16"  # the repo ships fp16 files; fp32 ones are twice the download

    def __init__(self, config: SvdConfig) -> None:
        self.config = config
        self.pipeline: Any = None
        self.model_loads = 0
        self._device = resolve_device(config.device)
        self._dtype = resolve_dtype(config.dtype, self.preferred_dtype, self._device)
        # The out-of-memory ladder lowers these; they stay lowered for the rest of the step,
        # as the next clip of the same size would run out of memory the same way.
        self.decode_chunk_size = config.decode_chunk_size
        self.forward_chunking = config.forward_chunking
        self.offload: Offload = config.offload

    @property
    def settings(self) -> ClipSettings:
        """The settings that go into every clip's content address."""
        config = self.config
        return ClipSettings(
            model_id=config.model,
            revision=config.revision or "main",
            width=config.width,
            height=config.height,
            frames=config.num_frames,
            steps=config.steps,
            fps=config.fps,
            motion_bucket_id=config.motion_bucket_id,
            noise_aug_strength=config.noise_aug_strength,
            min_guidance_scale=config.min_guidance_scale,
            max_guidance_scale=config.max_guidance_scale,
        )

    @property
    def device(self) -> str:
        """Where the model runs, as recorded in the run metadata."""
        return str(self._device)

    def load(self) -> float:
        """Load the pipeline (once); returns the seconds it took."""
        if self.pipeline is not None:
            return 0.0
        started = time.perf_counter()
        pipeline = load_diffusers_pipeline(
            StableVideoDiffusionPipeline,
            self.config.model,
            revision=self.config.revision,
            dtype=self._dtype,
            variant=self.variant,
            allow_download=self.config.allow_download,
        )
        place_pipeline(pipeline, self.offload, self._device)
        if self.forward_chunking:
            pipeline.unet.enable_forward_chunking()
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline
        self.model_loads += 1
        return time.perf_counter() - started

    def unload(self) -> None:
        """Free the pipeline and the accelerator memory it holds."""
        self.pipeline = None
        free_accelerator_memory()

    def generate(self, image: Image.Image, seed: int) -> ClipResult:
        """One clip of ``image``; out of memory walks down the ladder, then fails this clip."""
        self.load()
        conditioning = conditioning_image(image, self.config.width, self.config.height)
        while True:
            try:
                frames, seconds, peak_mb = self._call(conditioning, seed)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    return ClipResult("failed", error=f"{type(exc).__name__}: {exc}")
                free_accelerator_memory()
                rung = self._lower_memory()
                if rung is None:
                    return ClipResult(
                        "failed",
                        error=f"{type(exc).__name__}: {exc}",
                        memory_fallback=self.memory_fallback,
                    )
                logger.warning("Out of memory making a clip; retrying with %s.", rung)
                continue
            return ClipResult(
                "ok",
                frames=frames,
                seconds=seconds,
                peak_gpu_memory_mb=peak_mb,
                memory_fallback=self.memory_fallback,
            )

    @property
    def memory_fallback(self) -> str | None:
        """The ladder rungs in force, e.g. "decode_chunk_size=2+forward_chunking"; None if none."""
        rungs = []
        if self.decode_chunk_size != self.config.decode_chunk_size:
            rungs.append(f"decode_chunk_size={self.decode_chunk_size}")
        if self.forward_chunking and not self.config.forward_chunking:
            rungs.append("forward_chunking")
        if self.offload != self.config.offload:
            rungs.append("model_cpu_offload")
        return "+".join(rungs) or None

    def _lower_memory(self) -> str | None:
        """Take the next rung of the ladder; returns its name, None when none is left."""
        # Cheapest first: decoding fewer frames at once costs almost nothing, chunked
        # feed-forward a little, model offload a lot (weights cross PCIe every step).
        if self.decode_chunk_size > 1:
            self.decode_chunk_size = max(1, self.decode_chunk_size // 2)
            return f"decode_chunk_size={self.decode_chunk_size}"
        if not self.forward_chunking:
            self.pipeline.unet.enable_forward_chunking()
            self.forward_chunking = True
            return "forward_chunking"
        if self.offload == "none":
            self.pipeline.enable_model_cpu_offload(device=self._device)
            self.offload = "model"
            return "model_cpu_offload"
        return None

    def _call(self, image: Image.Image, seed: int) -> tuple[list[Image.Image], float, float | None]:
        config = self.config
        on_cuda = self._device.type == "cuda"
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(self._device)
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.pipeline(
                image=image,
                width=config.width,
                height=config.height,
                num_frames=config.num_frames,
                num_inference_steps=config.steps,
                fps=config.fps,
                motion_bucket_id=config.motion_bucket_id,
                noise_aug_strength=config.noise_aug_strength,
                min_guidance_scale=config.min_guidance_scale,
                max_guidance_scale=config.max_guidance_scale,
                decode_chunk_size=self.decode_chunk_size,
                # A CPU generator: the same noise on every device, whatever ran before.
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="pil",
            )
        if on_cuda:
            torch.cuda.synchronize(self._device)
        seconds = time.perf_counter() - started
        peak_mb = torch.cuda.max_memory_allocated(self._device) / 2**20 if on_cuda else None
        return list(output.frames[0]), seconds, peak_mb
