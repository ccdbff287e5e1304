"""ImageReward.pt: its tensors under BLIP's original names, and the transformers modules they
load into (``BlipVisionModel``, ``BlipTextModel``, the reward head), Dagster-free.

ImageReward's checkpoint is the ``state_dict()`` of the package's ``ImageReward`` module:
``blip.visual_encoder`` (BLIP's vit.py, timm's names), ``blip.text_encoder`` (BLIP's med.py
BertModel with cross-attention), BLIP_Pretrain's ``blip.vision_proj`` / ``blip.text_proj``, and
``mlp.layers``. :func:`split_checkpoint` renames it for transformers, :func:`blip_configs`
derives the two configs, and every tensor is accounted for: used, or listed in
:data:`IGNORED_KEYS`. Imports torch and transformers inside the functions.
"""

from __future__ import annotations

import math
import re
from itertools import pairwise
from typing import Any

CHECKPOINT = "ImageReward.pt"
MED_CONFIG = "med_config.json"
# BLIP's ViTs (create_vit "base" 768/12 heads, "large" 1024/16) have 64-wide heads; the
# checkpoint has no vision config, and the head count is the one thing shapes do not tell.
VISION_HEAD_WIDTH = 64
VISION_LAYER_NORM_EPS = 1e-6  # vit.py: partial(nn.LayerNorm, eps=1e-6); transformers' is 1e-5
# Keys of ImageReward.pt the score never reads: BLIP_Pretrain's contrastive projections (built
# by its __init__, saved with the module, unused by ImageReward) and med.py's position_ids
# buffer (torch.arange(512), which transformers rebuilds as a non-persistent buffer).
IGNORED_KEYS = frozenset(
    {
        "blip.vision_proj.weight",
        "blip.vision_proj.bias",
        "blip.text_proj.weight",
        "blip.text_proj.bias",
        "blip.text_encoder.embeddings.position_ids",
    }
)
# What BlipTextConfig takes from med_config.json as it is (encoder_width is not among them).
MED_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "max_position_embeddings", "hidden_act",
                 "layer_norm_eps", "pad_token_id")  # fmt: skip
MLP_LINEARS = (0, 2, 4, 6, 7)  # mlp.layers: Linear, Dropout(0.2), Linear, Dropout(0.2), ...
MLP_DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}
MLP_WIDTHS = (1024, 128, 64, 16, 1)  # ImageReward's MLP(768): fixed widths after the input
# med_config.json of THUDM/ImageReward (= train/src/config/med_config.json of the source):
# BERT-base plus encoder_width and add_cross_attention. encoder_width says 768 but
# BLIP_Pretrain replaces it by the ViT's width (1024), so the loader never reads it.
REAL_MED = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02,
    "intermediate_size": 3072, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
    "model_type": "bert", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0,
    "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768, "add_cross_attention": True,
}  # fmt: skip


def original_shapes(vocab_size: int, med: dict[str, Any], vision: dict[str, int]) -> dict:
    """Every tensor of an ImageReward ``state_dict()`` under BLIP's names, with its shape:
    vit.py's VisionTransformer, med.py's BertModel (no pooler, cross-attention from the ViT's
    width), BLIP_Pretrain's two projections (embed_dim 256) and ImageReward's MLP."""
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out: int, into: int) -> None:
        shapes.update({f"{name}.weight": (out, into), f"{name}.bias": (out,)})

    def norm(name: str, width: int) -> None:
        shapes.update({f"{name}.weight": (width,), f"{name}.bias": (width,)})

    v, patch, t = vision["width"], vision["patch"], med["hidden_size"]
    inner = med["intermediate_size"]
    vis, txt = "blip.visual_encoder", "blip.text_encoder"
    shapes[f"{vis}.cls_token"] = (1, 1, v)
    shapes[f"{vis}.pos_embed"] = (1, (vision["image"] // patch) ** 2 + 1, v)
    shapes |= {f"{vis}.patch_embed.proj.weight": (v, 3, patch, patch)}
    shapes |= {f"{vis}.patch_embed.proj.bias": (v,)}
    for i in range(vision["depth"]):
        block = f"{vis}.blocks.{i}"
        norm(f"{block}.norm1", v)
        linear(f"{block}.attn.qkv", 3 * v, v)
        linear(f"{block}.attn.proj", v, v)
        norm(f"{block}.norm2", v)
        linear(f"{block}.mlp.fc1", 4 * v, v)
        linear(f"{block}.mlp.fc2", v, 4 * v)
    norm(f"{vis}.norm", v)
    shapes[f"{txt}.embeddings.word_embeddings.weight"] = (vocab_size, t)
    shapes[f"{txt}.embeddings.position_embeddings.weight"] = (med["max_position_embeddings"], t)
    norm(f"{txt}.embeddings.LayerNorm", t)
    for i in range(med["num_hidden_layers"]):
        layer = f"{txt}.encoder.layer.{i}"
        for attention, source in (("attention", t), ("crossattention", v)):
            linear(f"{layer}.{attention}.self.query", t, t)
            linear(f"{layer}.{attention}.self.key", t, source)
            linear(f"{layer}.{attention}.self.value", t, source)
            linear(f"{layer}.{attention}.output.dense", t, t)
            norm(f"{layer}.{attention}.output.LayerNorm", t)
        linear(f"{layer}.intermediate.dense", inner, t)
        linear(f"{layer}.output.dense", t, inner)
        norm(f"{layer}.output.LayerNorm", t)
    linear("blip.vision_proj", 256, v)
    linear("blip.text_proj", 256, t)
    for index, (into, out) in zip(MLP_LINEARS, pairwise((t, *MLP_WIDTHS)), strict=True):
        linear(f"mlp.layers.{index}", out, into)
    return shapes


# The renames of transformers' convert_blip_original_pytorch_to_hf.py (rename_key), for the
# vision tower; BLIP's text encoder already has BlipTextModel's names (med.py is where
# modeling_blip_text.py comes from).
VISION_PREFIX, TEXT_PREFIX, MLP_PREFIX = "blip.visual_encoder.", "blip.text_encoder.", "mlp.layers."
VISION_NAMES = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj": "embeddings.patch_embedding",
    "norm": "post_layernorm",
}
VISION_BLOCK_NAMES = {
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def _vision_name(key: str) -> str | None:
    """The BlipVisionModel name of a ``blip.visual_encoder`` key (prefix removed); None if
    BLIP's ViT has no such tensor."""
    if block := re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key):
        layer, module, kind = block.groups()
        renamed = VISION_BLOCK_NAMES.get(module)
        return renamed and f"encoder.layers.{layer}.{renamed}.{kind}"
    module, _, kind = key.rpartition(".") if key.endswith((".weight", ".bias")) else (key, "", "")
    renamed = VISION_NAMES.get(module)
    return renamed and (f"{renamed}.{kind}" if kind else renamed)


def split_checkpoint(state: dict[str, Any]) -> tuple[dict, dict, dict]:
    """ImageReward.pt's tensors as (BlipVisionModel, BlipTextModel, MLP) state dicts. Every key
    is used or in :data:`IGNORED_KEYS`; any other key is an error (a different checkpoint)."""
    vision: dict[str, Any] = {}
    text: dict[str, Any] = {}
    mlp: dict[str, Any] = {}
    unknown = []
    for key, tensor in state.items():
        if key in IGNORED_KEYS:
            continue
        if key.startswith(VISION_PREFIX) and (name := _vision_name(key[len(VISION_PREFIX) :])):
            vision[name] = tensor
        elif key.startswith(TEXT_PREFIX):  # a stray text key fails the strict load
            text[key.removeprefix(TEXT_PREFIX)] = tensor
        elif key.startswith(MLP_PREFIX):
            mlp[key.removeprefix(MLP_PREFIX)] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{CHECKPOINT} has keys ImageReward does not: {', '.join(unknown)}")
    return vision, text, mlp


def blip_configs(state: dict[str, Any], med: dict[str, Any]) -> tuple[Any, Any]:
    """(BlipVisionConfig, BlipTextConfig) of a checkpoint: the ViT from its tensor shapes
    (BLIP's create_vit hard-codes it; ImageReward uses 224 px), the text encoder from
    med_config.json, cross-attending to the ViT's width as BLIP_Pretrain sets it."""
    from transformers import BlipTextConfig, BlipVisionConfig

    if med.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{MED_CONFIG}: only absolute position embeddings are supported")
    vis = VISION_PREFIX
    width = state[f"{vis}cls_token"].shape[-1]
    patch = state[f"{vis}patch_embed.proj.weight"].shape[-1]
    blocks = {int(k.split(".")[3]) for k in state if k.startswith(f"{vis}blocks.")}
    vision = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=state[f"{vis}blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=len(blocks),
        num_attention_heads=width // VISION_HEAD_WIDTH,
        image_size=math.isqrt(state[f"{vis}pos_embed"].shape[1] - 1) * patch,
        patch_size=patch,
        hidden_act="gelu",  # vit.py's nn.GELU: the exact (erf) GELU
        layer_norm_eps=VISION_LAYER_NORM_EPS,
    )
    text = BlipTextConfig(
        **{key: med[key] for key in MED_TEXT_KEYS},
        encoder_hidden_size=width,
        # Ids for generation, which scoring never does (the defaults are BLIP's 30524 tokens).
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
        # transformers builds a layer's cross-attention only for decoders; the scorer calls
        # the model with is_decoder=False, so self-attention stays bidirectional as in med.py.
        is_decoder=True,
    )
    return vision, text


def reward_head(mlp_state: dict[str, Any]) -> Any:
    """ImageReward's ``mlp.layers``, sized from its weights: five Linear layers and no
    activation between them (the ReLUs are commented out in the source), so the head is one
    affine map; the dropouts only keep the layer numbers of the checkpoint."""
    import torch.nn as nn

    layers: list[nn.Module] = []
    for index in range(max(MLP_LINEARS) + 1):
        if index in MLP_DROPOUTS:
            layers.append(nn.Dropout(MLP_DROPOUTS[index]))
        elif f"{index}.weight" in mlp_state:
            out, into = mlp_state[f"{index}.weight"].shape
            layers.append(nn.Linear(into, out))
        else:
            raise ValueError(f"{CHECKPOINT} has no {MLP_PREFIX}{index}.weight")
    return nn.Sequential(*layers)
