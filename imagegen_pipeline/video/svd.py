"""Stable Video Diffusion: a short clip from one still image, without Dagster.

The model is loaded once per step and called once per clip. Every clip has its own CPU
generator seeded from the source image's id, so a clip can be made again alone, on any device.
CUDA out-of-memory errors walk down a ladder of cheaper settings before a clip fails; the rung a
clip needed is recorded with it.
"""

from __future__ import annotations

import logging
import time

import torch
from PIL import Image, ImageOps

from imagegen_pipeline.model_settings import SvdSettings
from imagegen_pipeline.torch_runtime import (
    DiffusersModel,
    PeakMemory,
    free_accelerator_memory,
    is_out_of_memory,
    resolve_device,
    resolve_dtype,
)
from imagegen_pipeline.video.video_clip import (
    VideoClipResult,
    VideoClipSettings,
    video_clip_settings,
)

logger = logging.getLogger(__name__)


def check_settings(settings: SvdSettings) -> None:
    """Raise ValueError for sizes and counts SVD cannot run with (after resolution)."""
    width, height = settings.width or 0, settings.height or 0
    if width % 8 or height % 8 or min(width, height) < 64:
        raise ValueError(
            f"SVD needs a width and height of at least 64 that are multiples of 8, "
            f"not {width}x{height}"
        )
    for name in ("num_frames", "steps", "fps", "decode_chunk_size"):
        value = getattr(settings, name)
        if value is None or value < 1:
            raise ValueError(f"{name} must be at least 1, not {value}")


def conditioning_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` scaled to cover ``width`` x ``height`` and centre-cropped to it."""
    return ImageOps.fit(image.convert("RGB"), (width, height), Image.Resampling.LANCZOS)


class SvdGenerator(DiffusersModel):
    """StableVideoDiffusionPipeline, loaded once, called once per clip."""

    preferred_dtype = "float16"  # a torch_runtime.DTYPES name, as resolve_dtype expects
    variant = "fp16"  # the repo ships fp16 files; fp32 ones are twice the download

    def __init__(self, config: SvdSettings, model_id: str | None = None) -> None:
        check_settings(config)
        self.config = config
        self.model_id = model_id or config.model
        self._device = resolve_device(config.device)
        self._dtype = resolve_dtype(config.dtype, self.preferred_dtype, self._device)
        # The out-of-memory ladder lowers these; they stay lowered for the rest of the step,
        # as the next clip of the same size would run out of memory the same way.
        self.decode_chunk_size = config.decode_chunk_size
        self.forward_chunking = config.forward_chunking
        self.offload: str = config.offload

    @property
    def settings(self) -> VideoClipSettings:
        """The settings that go into every clip's content address."""
        return video_clip_settings(self.config, self.model_id)

    @property
    def device(self) -> str:
        """Where the model runs, as recorded in the run metadata."""
        return str(self._device)

    def load(self) -> float:
        """Load the pipeline (once); returns the seconds it took."""
        if self.pipeline is not None:
            return 0.0
        started = time.perf_counter()
        # Imported here, not at the top: the pipeline module pulls in most of diffusers and
        # transformers (seconds), and a step whose clips all exist never loads the model.
        from diffusers import StableVideoDiffusionPipeline

        pipeline = self.load_pipeline(
            StableVideoDiffusionPipeline,
            self.config,
            dtype=self._dtype,
            variant=self.variant,
            offload=self.offload,
            device=self._device,
        )
        if self.forward_chunking:
            pipeline.unet.enable_forward_chunking()
        self.pipeline = pipeline
        return time.perf_counter() - started

    def generate(self, image: Image.Image, seed: int) -> VideoClipResult:
        """One clip of ``image``; out of memory walks down the ladder, then fails this clip."""
        self.load()
        conditioning = conditioning_image(image, self.config.width, self.config.height)
        while True:
            try:
                frames, seconds, peak_mb = self._call(conditioning, seed)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    return VideoClipResult("failed", error=f"{type(exc).__name__}: {exc}")
                free_accelerator_memory()
                rung = self._lower_memory()
                if rung is None:
                    return VideoClipResult(
                        "failed",
                        error=f"{type(exc).__name__}: {exc}",
                        memory_fallback=self.memory_fallback,
                    )
                logger.warning("Out of memory making a clip; retrying with %s.", rung)
                continue
            return VideoClipResult(
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
        started = time.perf_counter()
        with PeakMemory(self._device) as peak, torch.inference_mode():
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
        return list(output.frames[0]), time.perf_counter() - started, peak.mib
