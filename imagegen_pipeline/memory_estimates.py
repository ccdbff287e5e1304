"""Activation estimates per pipeline component, one image at a time, from configs alone.

Each function takes a component's config (``config.json``, defaults filled in) and the image
size, T5 tokens, pixels per latent cell and bytes per element, and returns the bytes that one
image's forward pass holds at its widest moment. Backend modules name which estimate each of
their components uses (``ModelSpec.memory``); ``memory_fit`` adds them up and decides. A new
architecture adds its own function beside its model. The estimates err on the large side and
were checked against peak memory of real-width blocks on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# FluxPipeline's default max_sequence_length: the T5 tokens the transformer attends to when
# the caller does not say (the project's FLUX settings use 256).
DEFAULT_T5_TOKENS = 512

# FLUX transformer, per token, in units of the hidden width D = heads * head_dim: what a
# single-stream block (the widest moment of the model) holds at once, counted in diffusers'
# FluxSingleTransformerBlock/FluxAttnProcessor:
#   1  the block's input, still referenced by the caller
#   1  its concatenation with the text tokens (also the residual)
#   1  the modulated LayerNorm output, used by both branches
#   4  the MLP branch after GELU (4x hidden), kept until the output projection
#   3  q, k, v
#   8  RoPE applied to q then k: it works in float32 (2 units per tensor) on the tensor, its
#      rotated copy and their products, and writes a new q/k
# = 18, rounded up to 20 for the attention output and the [attn, mlp] concat that replace
# the RoPE temporaries. Attention itself goes through SDPA (flash/memory-efficient kernels),
# so there is no seq x seq matrix. Measured on a CPU with real-width blocks: 170 MiB against
# 150 estimated at 512 px, 308 against 300 at 768 px (bf16), 273 against 300 in float32.
FLUX_LIVE_WIDTHS = 20

# SDXL UNet transformer blocks, per token, in units of the level's channels C: the block
# input and its normalised copy (2), the GEGLU projection to 8C (8), GELU of its gate half
# (4) and the product (4), plus the proj_in/proj_out reshapes around the block (2). The
# self-attention's q, k, v and output (4C) are freed before the feed-forward runs.
UNET_TRANSFORMER_WIDTHS = 20

# VAE decoder at full resolution: the widest tensors are the last upsampler's output and the
# first full-resolution ResNet's input, GroupNorm output and SiLU output (ops there are
# out of place), i.e. three live tensors of that width, plus one for the conv's cuDNN
# workspace and the upsampler's source. Measured on a CPU at 512 px: 1034 MiB (float32)
# and 560 MiB (bf16) against 1024 and 512 MiB from this term alone.
VAE_LIVE_TENSORS = 4


def flux_transformer(
    config: Mapping[str, Any],
    *,
    width: int,
    height: int,
    text_tokens: int | None,
    scale: int,
    bpe: int,
) -> int:
    """FluxTransformer2DModel, one image: (image + text tokens) x hidden x live widths."""
    # Latents are H/8 x W/8 and the pipeline packs 2x2 of them per token: one token per
    # 16x16 pixels. The text tokens (T5) join the same sequence in every block.
    text_tokens = DEFAULT_T5_TOKENS if text_tokens is None else text_tokens
    image_tokens = math.ceil(height / (2 * scale)) * math.ceil(width / (2 * scale))
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    return (image_tokens + text_tokens) * hidden * FLUX_LIVE_WIDTHS * bpe


def unet(
    config: Mapping[str, Any],
    *,
    width: int,
    height: int,
    text_tokens: int | None,
    scale: int,
    bpe: int,
) -> int:
    """UNet2DConditionModel, one image: the widest moment of any level, plus the skip tensors."""
    channels = list(config["block_out_channels"])
    levels = len(channels)
    latent_h, latent_w = math.ceil(height / scale), math.ceil(width / scale)
    # Each level halves the latent's side: a quarter of the tokens of the level above.
    tokens = [math.ceil(latent_h / 2**i) * math.ceil(latent_w / 2**i) for i in range(levels)]
    attention = ["CrossAttn" in block for block in config["down_block_types"]]
    # The mid block sits at the lowest resolution and has attention in SDXL.
    attention[-1] = attention[-1] or "CrossAttn" in str(config.get("mid_block_type") or "")
    layers = config["layers_per_block"]
    layers = list(layers) if isinstance(layers, list | tuple) else [layers] * levels

    widest = 0
    for i, width_c in enumerate(channels):
        # Up-path ResNets take the upsampled level below concatenated with this level's skip
        # (e.g. 1280 + 640 at SDXL's middle level): that input, its GroupNorm and SiLU
        # outputs are live together, plus the conv's output at the level's width.
        concat = channels[min(i + 1, levels - 1)] + width_c
        widest = max(widest, tokens[i] * (3 * concat + width_c))
        if attention[i]:
            widest = max(widest, tokens[i] * width_c * UNET_TRANSFORMER_WIDTHS)

    # The down path's outputs (conv_in, each ResNet/transformer pair, each downsampler) are
    # kept for the up path's skip connections for the whole forward.
    skips = tokens[0] * channels[0]
    for i, width_c in enumerate(channels):
        skips += layers[i] * width_c * tokens[i]
        if i < levels - 1:
            skips += width_c * tokens[i + 1]
    return (widest + skips) * bpe


def vae_decode(
    config: Mapping[str, Any],
    *,
    width: int,
    height: int,
    text_tokens: int | None,
    scale: int,
    bpe: int,
) -> int:
    """AutoencoderKL decode of one image at full resolution."""
    channels = list(config["block_out_channels"])
    # The decoder reverses block_out_channels: the last upsampler brings the second level's
    # width (256 of 128/256/512/512) up to full resolution, ahead of the last level (128).
    full_res_channels = max(channels[:2])
    feature_maps = height * width * full_res_channels * VAE_LIVE_TENSORS
    # The mid block's single-head attention over every latent cell has a head 512 wide; flash
    # attention stops at 256, and where the memory-efficient kernel cannot take it either,
    # SDPA's math fallback materialises the scores and their softmax (2 x cells^2).
    attention = 0
    if config.get("mid_block_add_attention", True):
        cells = math.ceil(height / scale) * math.ceil(width / scale)
        attention = 2 * cells * cells
    return (feature_maps + attention) * bpe


def text_encoder(
    config: Mapping[str, Any],
    *,
    width: int,
    height: int,
    text_tokens: int | None,
    scale: int,
    bpe: int,
) -> int:
    """A CLIP or T5 text encoder, one prompt: per-token tensors plus the attention scores."""
    # CLIP tokenizers pad to the absolute position table (77); T5 has relative positions and
    # reads the pipeline's max_sequence_length.
    tokens = config.get("max_position_embeddings") or (
        DEFAULT_T5_TOKENS if text_tokens is None else text_tokens
    )
    hidden = config.get("hidden_size") or config["d_model"]
    ff = config.get("intermediate_size") or config["d_ff"]
    heads = config.get("num_attention_heads") or config["num_heads"]
    layers = config.get("num_hidden_layers") or config["num_layers"]
    # Residual, normed input, attention output (3) and q, k, v (3); the MLP's pre- and
    # post-activation (2 x ff), or for a gated MLP (T5 v1.1) both input projections and
    # their product (3 x ff); and every layer's hidden states, which SDXL requests to take
    # the penultimate one (layers + 1).
    mlp = 3 * ff if config.get("is_gated_act") else 2 * ff
    per_token = 6 * hidden + mlp + (layers + 1) * hidden
    # T5's relative position bias rules out fused attention, and softmax runs in float32:
    # scores and probabilities materialised per head.
    scores = 2 * heads * tokens * tokens * 4
    return tokens * per_token * bpe + scores
