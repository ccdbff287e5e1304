"""Stable Diffusion 1.5: a plugin backend, everything declared in this one module.

The project never names it: installing this distribution adds ``sd15`` to the backends (CSV
``backends`` column, partitions, sensors, schedule, CLI, ``imagegen models``, comparison).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from imagegen_pipeline import memory_estimates
from imagegen_pipeline.backends.diffusers_text_to_image import DiffusersTextToImage
from imagegen_pipeline.model_settings import TINY_IMAGE_SIDE, DiffusersImageSettings
from imagegen_pipeline.model_spec import MemoryHooks, ModelSpec, WeightSource
from imagegen_pipeline.tiny_models import (
    clip_text_config,
    tiny_vae_kl,
    write_clip_tokenizer,
    write_json,
    write_model_index,
)


class Sd15Settings(DiffusersImageSettings):
    """Stable Diffusion 1.5 through diffusers' StableDiffusionPipeline (512 px, guided)."""

    steps: int = Field(25, description="denoising steps")
    guidance: float = Field(7.5, description="classifier-free guidance")

    def uses_negative_prompt(self) -> bool:
        return self.guidance > 1.0


def build_tiny(dest: Path) -> None:
    """A tiny SD 1.5 in the stable-diffusion-v1-5 repo layout (no safety checker)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    write_json(
        dest / "scheduler" / "scheduler_config.json",
        {
            "_class_name": "PNDMScheduler",
            "_diffusers_version": "0.6.0",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "num_train_timesteps": 1000,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "trained_betas": None,
        },
    )
    vocab = write_clip_tokenizer(dest / "tokenizer")
    CLIPTextModel(clip_text_config(vocab)).save_pretrained(dest / "text_encoder")
    UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=2,
        cross_attention_dim=32,
    ).save_pretrained(dest / "unet")
    tiny_vae_kl(latent_channels=4, scaling_factor=0.18215).save_pretrained(dest / "vae")
    write_model_index(
        dest,
        "StableDiffusionPipeline",
        {
            "scheduler": ("diffusers", "PNDMScheduler"),
            "text_encoder": ("transformers", "CLIPTextModel"),
            "tokenizer": ("transformers", "CLIPTokenizer"),
            "unet": ("diffusers", "UNet2DConditionModel"),
            "vae": ("diffusers", "AutoencoderKL"),
            "safety_checker": (None, None),
            "feature_extractor": (None, None),
        },
        requires_safety_checker=False,
    )


SPEC = ModelSpec(
    name="sd15",
    role="image",
    implementation="imagegen_sd15.backend:Sd15Backend",
    settings=Sd15Settings,
    default_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
    model_env_var="IMAGEGEN_SD15_MODEL",
    weights=WeightSource(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        allow_patterns=("*.json", "*.txt", "tokenizer/*", "*.fp16.safetensors"),
    ),
    dtype="float16",
    variant="fp16",
    defaults={"width": 512, "height": 512},
    tiny_defaults={"width": TINY_IMAGE_SIDE, "height": TINY_IMAGE_SIDE},
    tiny_builder=build_tiny,
    memory=MemoryHooks(
        activations={
            "unet": memory_estimates.unet,
            "vae": memory_estimates.vae_decode,
            "text_encoder": memory_estimates.text_encoder,
        }
    ),
    lora_components=("unet", "text_encoder"),
)


class Sd15Backend(DiffusersTextToImage):
    """StableDiffusionPipeline from the stable-diffusion-v1-5 layout."""

    spec = SPEC
    pipeline_class_name = "StableDiffusionPipeline"

    config: Sd15Settings
