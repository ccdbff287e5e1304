"""Stable Video Diffusion: a short clip from one still image, without Dagster.

The model is loaded once per step and called once per clip. Every clip has its own CPU
generator seeded from the source image's id, so a clip can be made again alone, on any device.
CUDA out-of-memory errors walk down a ladder of cheaper settings before a clip fails; the rung a
clip needed is recorded with it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

from PIL import Image, ImageOps
from pydantic import Field

from imagegen_pipeline.model_settings import Dtype, ModelSettings
from imagegen_pipeline.model_spec import ModelSpec, WeightSource
from imagegen_pipeline.tiny_models import (
    CLIP_MEAN,
    CLIP_STD,
    save_with_fp16_variant,
    write_json,
    write_model_index,
)
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


class SvdSettings(ModelSettings):
    """Stable Video Diffusion XT image-to-video; None means the model card's value."""

    dtype: Dtype = Field("auto", description="'auto': float16 on a GPU, float32 on a CPU")
    offload: Literal["none", "model", "sequential"] = Field("none", description="CPU offload")
    forward_chunking: bool = Field(False, description="chunked UNet feed-forward: less memory")
    decode_chunk_size: int | None = Field(None, description="frames decoded at once (8)")
    width: int | None = Field(None, description="clip width (1024); the source is cropped to it")
    height: int | None = Field(None, description="clip height (576)")
    num_frames: int | None = Field(None, description="frames per clip (25 for XT)")
    steps: int | None = Field(None, description="denoising steps (25)")
    fps: int = Field(7, description="frame rate the model is conditioned on and the MP4 plays at")
    motion_bucket_id: int = Field(127, description="higher: more motion")
    noise_aug_strength: float = Field(0.02, description="noise on the conditioning image")
    min_guidance_scale: float = Field(1.0, description="guidance on the first frame")
    max_guidance_scale: float | None = Field(None, description="guidance on the last frame (3)")
    selection: Literal["all", "first_n", "top_n"] = Field(
        "first_n", description="which images of a prompt get a clip (top_n: by CLIP score)"
    )
    n: int = Field(1, description="clips per prompt for first_n and top_n")
    preview_side: int = Field(256, description="longest side of the animated WebP preview")


def build_tiny(dest: Path) -> None:
    """Build a tiny SVD-XT (StableVideoDiffusionPipeline) in the stabilityai repo layout."""
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    # The real svd-xt scheduler config, verbatim: v-prediction, Karras sigmas, continuous t.
    write_json(
        dest / "scheduler" / "scheduler_config.json",
        {
            "_class_name": "EulerDiscreteScheduler",
            "_diffusers_version": "0.24.0.dev0",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": False,
            "interpolation_type": "linear",
            "num_train_timesteps": 1000,
            "prediction_type": "v_prediction",
            "set_alpha_to_one": False,
            "sigma_max": 700.0,
            "sigma_min": 0.002,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "timestep_spacing": "leading",
            "timestep_type": "continuous",
            "trained_betas": None,
            "use_karras_sigmas": True,
        },
    )
    write_json(
        dest / "feature_extractor" / "preprocessor_config.json",
        {
            "crop_size": {"height": 224, "width": 224},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": CLIP_MEAN,
            "image_processor_type": "CLIPImageProcessor",
            "image_std": CLIP_STD,
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"shortest_edge": 224},
        },
    )

    # The pipeline always resizes the conditioning image to 224x224 before the encoder, so
    # image_size must stay 224; a 32-pixel patch keeps it to 49 tokens.
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=224,
            patch_size=32,
            projection_dim=32,
            hidden_act="gelu",
        )
    )
    # Real block types at the minimum width: the spatio-temporal blocks hard-code
    # GroupNorm(32), so channels cannot go below 32. in_channels 8 = noisy latents (4) +
    # conditioning-image latents (4); the added time embedding takes fps, motion bucket and
    # noise augmentation strength, 3 * 8. num_frames 25 keeps the real default.
    unet = UNetSpatioTemporalConditionModel(
        sample_size=96,
        in_channels=8,
        out_channels=4,
        down_block_types=(
            "CrossAttnDownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal",
            "CrossAttnDownBlockSpatioTemporal",
            "DownBlockSpatioTemporal",
        ),
        up_block_types=(
            "UpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
            "CrossAttnUpBlockSpatioTemporal",
        ),
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=3 * 8,
        cross_attention_dim=32,
        num_attention_heads=2,
        transformer_layers_per_block=1,
        num_frames=25,
    )
    vae = AutoencoderKLTemporalDecoder(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        sample_size=768,
        scaling_factor=0.18215,
        force_upcast=True,
    )

    for name, model in [("image_encoder", image_encoder), ("unet", unet), ("vae", vae)]:
        save_with_fp16_variant(model, dest / name)

    write_model_index(
        dest,
        "StableVideoDiffusionPipeline",
        {
            "feature_extractor": ("transformers", "CLIPImageProcessor"),
            "image_encoder": ("transformers", "CLIPVisionModelWithProjection"),
            "scheduler": ("diffusers", "EulerDiscreteScheduler"),
            "unet": ("diffusers", "UNetSpatioTemporalConditionModel"),
            "vae": ("diffusers", "AutoencoderKLTemporalDecoder"),
        },
    )


SPEC = ModelSpec(
    name="svd",
    role="video",
    implementation="imagegen_pipeline.video.svd:SvdGenerator",
    settings=SvdSettings,
    default_model="stabilityai/stable-video-diffusion-img2vid-xt",
    model_env_var="IMAGEGEN_SVD_MODEL",
    weights=WeightSource(
        "stabilityai/stable-video-diffusion-img2vid-xt",
        allow_patterns=("*.json", "*.txt", "*.fp16.safetensors"),
    ),
    dtype="float16",
    variant="fp16",  # the repo ships fp16 files; fp32 ones are twice the download
    defaults={
        "width": 1024,
        "height": 576,
        "num_frames": 25,
        "steps": 25,
        "decode_chunk_size": 8,
        "max_guidance_scale": 3.0,
    },
    # 64 px is the tiny SVD's smallest side; without guidance the UNet runs once per step.
    tiny_defaults={
        "width": 64,
        "height": 64,
        "num_frames": 4,
        "steps": 2,
        "decode_chunk_size": 4,
        "max_guidance_scale": 1.0,
    },
    tiny_builder=build_tiny,
)


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

    def __init__(self, config: SvdSettings, model_id: str | None = None) -> None:
        check_settings(config)
        self.config = config
        self.model_id = model_id or config.model
        self._device = resolve_device(config.device)
        self._dtype = resolve_dtype(config.dtype, SPEC.dtype, self._device)
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
            variant=SPEC.variant,
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
        import torch

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
