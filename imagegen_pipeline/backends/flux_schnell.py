"""FLUX.1-schnell: a 12B rectified-flow transformer distilled to 4 steps without guidance.

Everything about the backend is here: its settings, its registry entry (``SPEC``: repo, files to
pull, sizes, precision, memory estimates), the pipeline call and its tiny stand-in.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import Field

from imagegen_pipeline import memory_estimates
from imagegen_pipeline.backends.base import ImageRequest
from imagegen_pipeline.backends.controlnets import randomize_zero_convolutions
from imagegen_pipeline.backends.diffusers_text_to_image import DiffusersTextToImage
from imagegen_pipeline.model_settings import TINY_IMAGE_SIDE, DiffusersImageSettings
from imagegen_pipeline.model_spec import MemoryHooks, ModelSpec, WeightSource
from imagegen_pipeline.tiny_models import (
    clip_text_config,
    save_sharded,
    tiny_vae_kl,
    write_clip_tokenizer,
    write_json,
    write_model_index,
    write_t5_tokenizer,
)


class FluxSchnellSettings(DiffusersImageSettings):
    """FLUX.1-schnell through diffusers' FluxPipeline (bf16, 4 steps, no guidance, 1024 px)."""

    steps: int = Field(4, description="denoising steps (schnell is distilled to 4)")
    max_sequence_length: int = Field(256, description="T5 tokens read from each prompt")


def build_tiny(dest: Path) -> None:
    """Build a tiny FLUX.1-schnell (FluxPipeline) in the black-forest-labs repo layout."""
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    # The real schnell scheduler config, verbatim: no dynamic shifting, shift 1.0.
    write_json(
        dest / "scheduler" / "scheduler_config.json",
        {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "_diffusers_version": "0.30.0.dev0",
            "base_image_seq_len": 256,
            "base_shift": 0.5,
            "max_image_seq_len": 4096,
            "max_shift": 1.15,
            "num_train_timesteps": 1000,
            "shift": 1.0,
            "use_dynamic_shifting": False,
        },
    )

    clip_vocab = write_clip_tokenizer(dest / "tokenizer")
    text_encoder = CLIPTextModel(clip_text_config(clip_vocab))
    text_encoder.save_pretrained(dest / "text_encoder")

    t5_vocab = write_t5_tokenizer(dest / "tokenizer_2")
    # T5 v1.1 (gated-gelu) like the real encoder; relative position buckets mean any
    # sequence length works, including the pipeline's max_sequence_length=256.
    t5_config = T5Config(
        vocab_size=t5_vocab,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dense_act_fn="gelu_new",
        is_gated_act=True,
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        use_cache=False,
    )
    # The real text_encoder_2 and transformer are sharded; so are these, so the
    # index-json loading path is exercised too.
    save_sharded(T5EncoderModel(t5_config), dest / "text_encoder_2", shards=2)

    # 16 latent channels like the real VAE; the transformer sees 2x2-packed latents, so its
    # in_channels is 4 * 16. Head dim 16 = sum(axes_dims_rope).
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_config.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )
    save_sharded(transformer, dest / "transformer", shards=3)

    vae = tiny_vae_kl(
        latent_channels=16,
        shift_factor=0.1159,
        scaling_factor=0.3611,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    vae.save_pretrained(dest / "vae")

    write_model_index(
        dest,
        "FluxPipeline",
        {
            "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
            "text_encoder": ("transformers", "CLIPTextModel"),
            "text_encoder_2": ("transformers", "T5EncoderModel"),
            "tokenizer": ("transformers", "CLIPTokenizer"),
            "tokenizer_2": ("transformers", "T5TokenizerFast"),
            "transformer": ("diffusers", "FluxTransformer2DModel"),
            "vae": ("diffusers", "AutoencoderKL"),
        },
    )


def build_tiny_controlnet(base: Path, dest: Path) -> None:
    """A tiny FLUX ControlNet for the tiny model at ``base``, in the layout of
    InstantX/FLUX.1-dev-Controlnet-Canny (the control image goes through the VAE)."""
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(base / "transformer")
    config = transformer.config
    controlnet = FluxControlNetModel.from_transformer(
        transformer,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
    )
    randomize_zero_convolutions(controlnet)
    controlnet.save_pretrained(dest)


SPEC = ModelSpec(
    name="flux_schnell",
    role="image",
    implementation="imagegen_pipeline.backends.flux_schnell:FluxSchnellBackend",
    settings=FluxSchnellSettings,
    default_model="black-forest-labs/FLUX.1-schnell",
    model_env_var="IMAGEGEN_FLUX_SCHNELL_MODEL",
    # from_pretrained reads the diffusers folders; the single-file checkpoint at the repo
    # root would double a 34 GB download.
    weights=WeightSource(
        "black-forest-labs/FLUX.1-schnell",
        ignore_patterns=("flux1-schnell.safetensors", "*.md"),
    ),
    dtype="bfloat16",
    defaults={"width": 1024, "height": 1024},
    # FLUX.1-dev ControlNets steer schnell too (same transformer); no pose one by default.
    controlnets={
        "canny": "InstantX/FLUX.1-dev-Controlnet-Canny",
        "depth": "Shakker-Labs/FLUX.1-dev-ControlNet-Depth",
    },
    tiny_defaults={"width": TINY_IMAGE_SIDE, "height": TINY_IMAGE_SIDE},
    tiny_builder=build_tiny,
    memory=MemoryHooks(
        activations={
            "transformer": memory_estimates.flux_transformer,
            "vae": memory_estimates.vae_decode,
            "text_encoder": memory_estimates.text_encoder,
            "text_encoder_2": memory_estimates.text_encoder,
        },
        text_tokens_setting="max_sequence_length",
    ),
    lora_components=("transformer", "text_encoder"),
)


class FluxSchnellBackend(DiffusersTextToImage):
    """FluxPipeline from the black-forest-labs/FLUX.1-schnell layout."""

    spec = SPEC
    pipeline_class_name = "FluxPipeline"
    controlnet_pipeline_class_name = "FluxControlNetPipeline"
    controlnet_model_class_name = "FluxControlNetModel"
    build_tiny_controlnet = staticmethod(build_tiny_controlnet)

    config: FluxSchnellSettings

    def pipeline_kwargs(self, batch: Sequence[ImageRequest]) -> dict[str, Any]:
        return {"max_sequence_length": self.config.max_sequence_length}

    def control_kwargs(self, maps: list[Image.Image], scale: float) -> dict[str, Any]:
        return {"control_image": maps, "controlnet_conditioning_scale": scale}
