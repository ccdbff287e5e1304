"""SDXL-Turbo: SDXL distilled (adversarial diffusion distillation) to 1-4 steps at 512 px.

Everything about the backend is here: its settings, its registry entry (``SPEC``: repo, files to
pull, sizes, precision, memory estimates), the pipeline call and its tiny stand-in.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from imagegen_pipeline import memory_estimates
from imagegen_pipeline.backends.controlnets import randomize_zero_convolutions
from imagegen_pipeline.backends.diffusers_text_to_image import DiffusersTextToImage
from imagegen_pipeline.model_settings import TINY_IMAGE_SIDE, DiffusersImageSettings
from imagegen_pipeline.model_spec import MemoryHooks, ModelSpec, WeightSource
from imagegen_pipeline.tiny_models import (
    clip_text_config,
    save_with_fp16_variant,
    tiny_vae_kl,
    write_clip_tokenizer,
    write_json,
    write_model_index,
)


class SdxlTurboSettings(DiffusersImageSettings):
    """SDXL-Turbo through diffusers' StableDiffusionXLPipeline (fp16 files, 1 step, 512 px)."""

    steps: int = Field(1, description="denoising steps (1 to 4)")

    def uses_negative_prompt(self) -> bool:
        # The negative prompt only acts through classifier-free guidance, i.e. guidance > 1.
        return self.guidance > 1.0


def build_tiny(dest: Path) -> None:
    """Build a tiny SDXL-Turbo (StableDiffusionXLPipeline) in the stabilityai repo layout."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    # The real sdxl-turbo scheduler config, verbatim: "trailing" spacing makes 1 step work.
    write_json(
        dest / "scheduler" / "scheduler_config.json",
        {
            "_class_name": "EulerAncestralDiscreteScheduler",
            "_diffusers_version": "0.24.0.dev0",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": False,
            "interpolation_type": "linear",
            "num_train_timesteps": 1000,
            "prediction_type": "epsilon",
            "sample_max_value": 1.0,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "timestep_spacing": "trailing",
            "trained_betas": None,
            "use_karras_sigmas": False,
        },
    )

    vocab = write_clip_tokenizer(dest / "tokenizer")
    # The real tokenizer_2 (OpenCLIP bigG) pads with "!" rather than <|endoftext|>.
    write_clip_tokenizer(dest / "tokenizer_2", pad_token="!")
    text_encoder = CLIPTextModel(clip_text_config(vocab))
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(vocab, hidden_act="gelu"))

    # Same block types as the real UNet (plain, cross-attn, cross-attn) at tiny widths. The
    # cross-attention input is both encoders' hidden states concatenated (32 + 32); the
    # "text_time" embedding takes 6 micro-conditioning ids * 8 + the pooled projection (32).
    unet = UNet2DConditionModel(
        sample_size=64,  # the real one: the pipeline's default size is 64 * 8 = 512 px
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=(1, 1, 1),
        use_linear_projection=True,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    vae = tiny_vae_kl(latent_channels=4, scaling_factor=0.13025, force_upcast=True)

    for name, model in [
        ("text_encoder", text_encoder),
        ("text_encoder_2", text_encoder_2),
        ("unet", unet),
        ("vae", vae),
    ]:
        save_with_fp16_variant(model, dest / name)

    write_model_index(
        dest,
        "StableDiffusionXLPipeline",
        {
            "scheduler": ("diffusers", "EulerAncestralDiscreteScheduler"),
            "text_encoder": ("transformers", "CLIPTextModel"),
            "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
            "tokenizer": ("transformers", "CLIPTokenizer"),
            "tokenizer_2": ("transformers", "CLIPTokenizer"),
            "unet": ("diffusers", "UNet2DConditionModel"),
            "vae": ("diffusers", "AutoencoderKL"),
            # Optional IP-adapter components, listed as absent like in the real index.
            "feature_extractor": (None, None),
            "image_encoder": (None, None),
        },
        force_zeros_for_empty_prompt=True,
    )


def build_tiny_controlnet(base: Path, dest: Path) -> None:
    """A tiny SDXL ControlNet for the tiny model at ``base``, in the layout of
    diffusers/controlnet-canny-sdxl-1.0 (fp16 and fp32 files side by side)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    controlnet = ControlNetModel.from_unet(unet)
    randomize_zero_convolutions(controlnet)
    save_with_fp16_variant(controlnet, dest)


SPEC = ModelSpec(
    name="sdxl_turbo",
    role="image",
    implementation="imagegen_pipeline.backends.sdxl_turbo:SdxlTurboBackend",
    settings=SdxlTurboSettings,
    default_model="stabilityai/sdxl-turbo",
    model_env_var="IMAGEGEN_SDXL_TURBO_MODEL",
    weights=WeightSource(
        "stabilityai/sdxl-turbo",
        allow_patterns=("*.json", "*.txt", "tokenizer*/*", "*.fp16.safetensors"),
    ),
    dtype="float16",
    variant="fp16",  # the repo ships fp16 files; the fp32 ones are twice the download
    defaults={"width": 512, "height": 512},
    # SDXL ControlNets work with SDXL-Turbo's UNet (same architecture, distilled weights).
    controlnets={
        "canny": "diffusers/controlnet-canny-sdxl-1.0",
        "depth": "diffusers/controlnet-depth-sdxl-1.0",
        "pose": "thibaud/controlnet-openpose-sdxl-1.0",
    },
    tiny_defaults={"width": TINY_IMAGE_SIDE, "height": TINY_IMAGE_SIDE},
    tiny_builder=build_tiny,
    memory=MemoryHooks(
        activations={
            "unet": memory_estimates.unet,
            "vae": memory_estimates.vae_decode,
            "text_encoder": memory_estimates.text_encoder,
            "text_encoder_2": memory_estimates.text_encoder,
        },
        upcast_vae=True,
    ),
    lora_components=("unet", "text_encoder", "text_encoder_2"),
)


class SdxlTurboBackend(DiffusersTextToImage):
    """StableDiffusionXLPipeline from the stabilityai/sdxl-turbo layout."""

    spec = SPEC
    pipeline_class_name = "StableDiffusionXLPipeline"
    controlnet_pipeline_class_name = "StableDiffusionXLControlNetPipeline"
    controlnet_model_class_name = "ControlNetModel"
    build_tiny_controlnet = staticmethod(build_tiny_controlnet)

    config: SdxlTurboSettings
