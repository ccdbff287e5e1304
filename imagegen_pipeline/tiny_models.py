"""Tiny random-weight stand-ins for the real models, in the real Hugging Face repos' layout.

Each builder writes a directory that looks like the real repo (``model_index.json``, the same
subfolders, config and weight file names, fp16 variant files where the real repo ships them)
but holds models of a few megabytes at most, with random weights. The project's real loading
code (``DiffusionPipeline.from_pretrained(path, torch_dtype=..., variant=...)``,
``open_clip.create_model_and_transforms(...)``) therefore runs unchanged against them, offline,
in about a second on a CPU. The pictures they make are noise: they test plumbing, not quality.

Nothing here needs the network: tokenizers are written from vocabularies made in code, and
models are instantiated from configs with ``torch.manual_seed(0)``, so builds are deterministic.
This module deliberately does not import Dagster, and imports torch/diffusers/transformers
lazily inside the builders, because importing them costs seconds that callers which only want
:func:`is_tiny_model` should not pay.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import string
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagegen_pipeline.registry import MODELS

if TYPE_CHECKING:
    from transformers import CLIPTextConfig

# Written last into a finished build, so its presence means "complete" (see build_tiny_model).
MARKER_NAME = ".tiny-random-weights"
# Bump when a builder changes what it writes: builds with another version are rebuilt.
FORMAT_VERSION = 1

# What each tiny build stands in for, from the registry.
REAL_REPOS: dict[str, str] = {
    spec.tiny_model: spec.default_model for spec in MODELS.values() if spec.tiny_model
}

# Directory names mirror the real repos' names so paths read the same in logs and configs.
TINY_MODEL_DIRS: dict[str, str] = {
    name: repo.rsplit("/", 1)[-1] for name, repo in REAL_REPOS.items()
}

# Words that get whole-word tokens in the tiny vocabularies, so tokenization exercises BPE
# merges / Unigram word pieces and not only the single-character fallback.
_COMMON_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "and",
    "in",
    "on",
    "with",
    "at",
    "to",
    "for",
    "by",
    "from",
    "is",
    "photo",
    "picture",
    "image",
    "painting",
    "portrait",
    "cat",
    "dog",
    "man",
    "woman",
    "city",
    "street",
    "sky",
    "sun",
    "light",
    "red",
    "blue",
    "green",
    "white",
    "black",
    "style",
    "detailed",
    "high",
    "quality",
    "cinematic",
    "landscape",
]

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP byte -> printable character table that byte-level BPE vocabularies use."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _write_clip_tokenizer(dest: Path, pad_token: str = "<|endoftext|>") -> int:
    """Write a tiny CLIPTokenizer (vocab.json, merges.txt, configs) into ``dest``; return its size.

    The vocabulary is laid out like OpenAI CLIP's: 256 byte characters, the same with ``</w>``,
    the results of the merges, then ``<|startoftext|>`` and ``<|endoftext|>`` last. Every byte
    is covered, so any prompt tokenizes without unknowns, and end-of-text having the highest id
    keeps the legacy "pooled output = argmax(input_ids)" of CLIP text configs with
    ``eos_token_id=2`` pointing at the right token.
    """
    byte_chars = list(_bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[tuple[str, str]] = []
    known = set(vocab_list)
    # Merge each common word left to right ("c a" -> "ca", "ca t</w>" -> "cat</w>").
    for word in _COMMON_WORDS:
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if merged not in known:
                merges.append(pair)
                vocab_list.append(merged)
                known.add(merged)
            symbols = [merged, *symbols[2:]]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(vocab_list)}

    dest.mkdir(parents=True, exist_ok=True)
    _write_json(dest / "vocab.json", vocab)
    merge_lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (dest / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")

    def special(content: str) -> dict[str, Any]:
        return {
            "content": content,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        }

    _write_json(
        dest / "special_tokens_map.json",
        {
            "bos_token": special("<|startoftext|>"),
            "eos_token": special("<|endoftext|>"),
            # The real files spell a plain-character pad token ("!") as a bare string.
            "pad_token": special(pad_token) if pad_token.startswith("<|") else pad_token,
            "unk_token": special("<|endoftext|>"),
        },
    )
    _write_json(
        dest / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "bos_token": "<|startoftext|>",
            "clean_up_tokenization_spaces": True,
            "do_lower_case": True,
            "eos_token": "<|endoftext|>",
            "errors": "replace",
            "model_max_length": 77,
            "pad_token": pad_token,
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": "<|endoftext|>",
        },
    )
    return len(vocab)


def _clip_text_config(vocab_size: int, **overrides: Any) -> CLIPTextConfig:
    """A tiny CLIPTextConfig with the real repos' token ids and 77 positions."""
    from transformers import CLIPTextConfig

    # bos/eos/pad ids 0/2/1 are what the real (legacy) configs say; eos_token_id == 2 makes
    # CLIPTextModel pool at argmax(input_ids), i.e. at <|endoftext|>, the highest id.
    settings: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 32,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }
    return CLIPTextConfig(**(settings | overrides))


def _write_t5_tokenizer(dest: Path) -> int:
    """Write a tiny T5TokenizerFast (tokenizer.json + configs) built offline; return its size.

    The real one is a 32k SentencePiece Unigram model; this is a Unigram model over single
    characters (with and without the ``▁`` word prefix) plus a few whole words, in T5's id
    layout: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, then pieces, then 100 ``<extra_id_N>`` last.
    """
    from transformers import T5TokenizerFast

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [(f"▁{w}", -4.0) for w in _COMMON_WORDS]
    pieces += [(f"▁{c}", -8.0) for c in chars] + [(c, -8.0) for c in chars]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(100))]
    # model_max_length 512 like the real tokenizer_2: FLUX encodes prompts at 256 tokens.
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=100, model_max_length=512)
    tokenizer.save_pretrained(dest)
    return len(tokenizer)


def _save_sharded(model: Any, dest: Path, shards: int, **kwargs: Any) -> None:
    """save_pretrained into about ``shards`` safetensors shards plus an index, like big repos."""
    total_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    model.save_pretrained(dest, max_shard_size=math.ceil(total_bytes / shards) + 1, **kwargs)


def _save_with_fp16_variant(model: Any, dest: Path) -> None:
    """Save fp16 variant files and plain fp32 files side by side, as the real repos ship both."""
    # half()/float() rather than to(dtype): diffusers' to() warns about fp32-pinned modules
    # even when there are none.
    model.half().save_pretrained(dest, variant="fp16")
    # The fp32 save comes second so the shared config.json records float32, matching the
    # plain weights that a load without `variant` picks.
    model.float().save_pretrained(dest)


def _write_model_index(
    dest: Path,
    class_name: str,
    components: dict[str, tuple[str, str] | tuple[None, None]],
    **pipeline_config: Any,
) -> None:
    """Write model_index.json the way DiffusionPipeline.save_pretrained does."""
    import diffusers

    index: dict[str, Any] = {"_class_name": class_name, "_diffusers_version": diffusers.__version__}
    index |= {name: list(lib_and_class) for name, lib_and_class in components.items()}
    _write_json(dest / "model_index.json", index | pipeline_config)


def _tiny_vae_kl(latent_channels: int, **config: Any) -> Any:
    """A tiny AutoencoderKL with four levels, so the vae_scale_factor is the real 8."""
    # sample_size is the real 1024: it only sets the tile size of enable_tiling(), which
    # should kick in at the same image sizes as with the real VAE.
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=latent_channels,
        sample_size=1024,
        **config,
    )


# --------------------------------------------------------------------------------------------
# Builders: one per model, each writes the full layout into an empty directory
# --------------------------------------------------------------------------------------------


def build_flux_schnell(dest: Path) -> None:
    """Build a tiny FLUX.1-schnell (FluxPipeline) in the black-forest-labs repo layout."""
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    # The real schnell scheduler config, verbatim: no dynamic shifting, shift 1.0.
    _write_json(
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

    clip_vocab = _write_clip_tokenizer(dest / "tokenizer")
    text_encoder = CLIPTextModel(_clip_text_config(clip_vocab))
    text_encoder.save_pretrained(dest / "text_encoder")

    t5_vocab = _write_t5_tokenizer(dest / "tokenizer_2")
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
    _save_sharded(T5EncoderModel(t5_config), dest / "text_encoder_2", shards=2)

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
    _save_sharded(transformer, dest / "transformer", shards=3)

    vae = _tiny_vae_kl(
        latent_channels=16,
        shift_factor=0.1159,
        scaling_factor=0.3611,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    vae.save_pretrained(dest / "vae")

    _write_model_index(
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


def build_sdxl_turbo(dest: Path) -> None:
    """Build a tiny SDXL-Turbo (StableDiffusionXLPipeline) in the stabilityai repo layout."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    # The real sdxl-turbo scheduler config, verbatim: "trailing" spacing makes 1 step work.
    _write_json(
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

    vocab = _write_clip_tokenizer(dest / "tokenizer")
    # The real tokenizer_2 (OpenCLIP bigG) pads with "!" rather than <|endoftext|>.
    _write_clip_tokenizer(dest / "tokenizer_2", pad_token="!")
    text_encoder = CLIPTextModel(_clip_text_config(vocab))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(vocab, hidden_act="gelu"))

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
    vae = _tiny_vae_kl(latent_channels=4, scaling_factor=0.13025, force_upcast=True)

    for name, model in [
        ("text_encoder", text_encoder),
        ("text_encoder_2", text_encoder_2),
        ("unet", unet),
        ("vae", vae),
    ]:
        _save_with_fp16_variant(model, dest / name)

    _write_model_index(
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


def build_svd_xt(dest: Path) -> None:
    """Build a tiny SVD-XT (StableVideoDiffusionPipeline) in the stabilityai repo layout."""
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    # The real svd-xt scheduler config, verbatim: v-prediction, Karras sigmas, continuous t.
    _write_json(
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
    _write_json(
        dest / "feature_extractor" / "preprocessor_config.json",
        {
            "crop_size": {"height": 224, "width": 224},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": _CLIP_MEAN,
            "image_processor_type": "CLIPImageProcessor",
            "image_std": _CLIP_STD,
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
        _save_with_fp16_variant(model, dest / name)

    _write_model_index(
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


def build_open_clip_vit_l_14(dest: Path) -> None:
    """Build a tiny open_clip CLIP in the hub layout (open_clip_config.json + safetensors).

    The real model is ``open_clip.create_model_and_transforms("ViT-L-14", pretrained="openai")``
    (weights from the hub repo ``timm/vit_large_patch14_clip_224.openai``, tokenizer
    ``open_clip.get_tokenizer("ViT-L-14")``). The tiny one loads from its directory through
    open_clip's ``local-dir:`` schema, which reads ``open_clip_config.json`` and the checkpoint
    next to it::

        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")

    The text tower keeps the real context length (77) and vocabulary size (49408) because the
    tokenizer is open_clip's own BPE SimpleTokenizer shipped in the package; the image tower
    keeps the real 224-pixel input, so the returned preprocess matches the real one.
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model_cfg = {
        "embed_dim": 32,
        # The OpenAI weights were trained with QuickGELU; open_clip sets this for that tag.
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": 224,
            "layers": 1,
            "width": 32,
            "head_width": 16,
            "patch_size": 32,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    model = open_clip.CLIP(**model_cfg)
    dest.mkdir(parents=True, exist_ok=True)
    _write_json(
        dest / "open_clip_config.json",
        {"model_cfg": model_cfg, "preprocess_cfg": {"mean": _CLIP_MEAN, "std": _CLIP_STD}},
    )
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, dest / "open_clip_model.safetensors")


TINY_MODELS: dict[str, Callable[[Path], None]] = {
    "flux_schnell": build_flux_schnell,
    "sdxl_turbo": build_sdxl_turbo,
    "svd_xt": build_svd_xt,
    "open_clip_vit_l_14": build_open_clip_vit_l_14,
}


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def _read_marker(path: Path) -> dict[str, Any] | None:
    """The marker's contents; None without a marker, {} for an unreadable one (rebuilt)."""
    try:
        text = (path / MARKER_NAME).read_text(encoding="utf-8")
    except OSError:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def is_tiny_model(path: Path) -> bool:
    """True when ``path`` is a tiny random-weight model built by this module."""
    return (Path(path) / MARKER_NAME).is_file()


def build_tiny_model(name: str, root: Path) -> Path:
    """Build tiny model ``name`` into ``root/<real repo dir name>`` (once) and return that path."""
    if name not in TINY_MODELS:
        raise KeyError(f"unknown tiny model {name!r}; known: {sorted(TINY_MODELS)}")
    root = Path(root)
    final = root / TINY_MODEL_DIRS[name]
    marker = _read_marker(final)
    if marker is not None and marker.get("format_version") == FORMAT_VERSION:
        return final
    if marker is None and final.exists() and not (final.is_dir() and not any(final.iterdir())):
        # Never overwrite something we did not build: it may be the real model.
        raise FileExistsError(f"{final} exists and is not a tiny model (no {MARKER_NAME})")

    root.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir and rename it into place, so readers (and concurrent
    # builders) only ever see a missing or a complete directory, never a half-written one.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=root))
    # mkdtemp makes the directory private (0700); the model should be as readable as any file.
    tmp.chmod(0o755)
    try:
        import torch
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        # A progress bar per saved shard would bury the demo's own output.
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        # Builders seed torch themselves; forking keeps the caller's RNG state untouched.
        with torch.random.fork_rng(devices=[]):
            TINY_MODELS[name](tmp)
        _write_json(
            tmp / MARKER_NAME,
            {
                "warning": "RANDOM WEIGHTS: a tiny stand-in for tests; its images are noise.",
                "name": name,
                "real_repo": REAL_REPOS[name],
                "format_version": FORMAT_VERSION,
            },
        )
        if marker is not None:
            # A stale build from an older FORMAT_VERSION: move it aside, then swap.
            stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.stale-", dir=root))
            with contextlib.suppress(FileNotFoundError):  # another builder moved it first
                os.replace(final, stale / final.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first; its build is as good as ours.
            if not is_tiny_model(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
