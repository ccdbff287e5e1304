"""The ImageReward module as THUDM/ImageReward builds it, for tests: names, shapes and forward.

Transcribed from the source (ImageReward/ImageReward.py, models/BLIP/blip_pretrain.py, med.py,
vit.py), not from the adapter, so the adapter's renaming and configs are checked against it:

- ``blip.visual_encoder``: vit.py's VisionTransformer is timm's (it imports timm's PatchEmbed
  and copies Block/Attention/Mlp with timm's attribute names), so timm's own class gives its
  state-dict keys and forward: no head, qkv bias, exact GELU, LayerNorm eps 1e-6;
- ``blip.text_encoder``: med.py's BertModel(add_pooling_layer=False), written out below: word
  and position embeddings (no token types), a persistent ``position_ids`` buffer, per layer
  self-attention, cross-attention whose key/value read the ViT's width, the feed-forward;
  attention masks as ``(1 - mask) * -10000``;
- ``blip.vision_proj`` / ``blip.text_proj``: BLIP_Pretrain's Linear(width, 256) each;
- ``mlp.layers``: Linear(768, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64),
  Dropout, Linear(64, 16), Linear(16, 1), no activations.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn


class Dense(nn.Module):
    """A module holding ``dense`` (and the residual ``LayerNorm`` when given an eps)."""

    def __init__(self, into: int, out: int, eps: float | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(into, out)
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(out, eps=eps)


class SelfAttention(nn.Module):
    def __init__(self, width: int, source: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(source, width)
        self.value = nn.Linear(source, width)

    def forward(self, hidden: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> Any:
        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(*x.shape[:2], self.heads, -1).permute(0, 2, 1, 3)

        query, key, value = (
            split(self.query(hidden)),
            split(self.key(source)),
            split(self.value(source)),
        )
        scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1]) + mask
        context = (scores.softmax(dim=-1) @ value).permute(0, 2, 1, 3)
        return context.reshape(*hidden.shape[:2], -1)


class Attention(nn.Module):
    def __init__(self, width: int, source: int, heads: int, eps: float) -> None:
        super().__init__()
        self.self = SelfAttention(width, source, heads)
        self.output = Dense(width, width, eps)

    def forward(self, hidden: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> Any:
        return self.output.LayerNorm(self.output.dense(self.self(hidden, source, mask)) + hidden)


class Layer(nn.Module):
    def __init__(self, med: dict[str, Any], encoder_width: int) -> None:
        super().__init__()
        width, heads, eps = med["hidden_size"], med["num_attention_heads"], med["layer_norm_eps"]
        self.attention = Attention(width, width, heads, eps)
        self.crossattention = Attention(width, encoder_width, heads, eps)
        self.intermediate = Dense(width, med["intermediate_size"])
        self.output = Dense(med["intermediate_size"], width, eps)

    def forward(self, hidden: Any, mask: Any, image: Any, image_mask: Any) -> Any:
        hidden = self.attention(hidden, hidden, mask)
        hidden = self.crossattention(hidden, image, image_mask)  # mode == "multimodal"
        inner = F.gelu(self.intermediate.dense(hidden))
        return self.output.LayerNorm(self.output.dense(inner) + hidden)


class Embeddings(nn.Module):
    def __init__(self, med: dict[str, Any]) -> None:
        super().__init__()
        width = med["hidden_size"]
        self.word_embeddings = nn.Embedding(med["vocab_size"], width, med["pad_token_id"])
        self.position_embeddings = nn.Embedding(med["max_position_embeddings"], width)
        self.LayerNorm = nn.LayerNorm(width, eps=med["layer_norm_eps"])
        positions = torch.arange(med["max_position_embeddings"]).expand((1, -1))
        self.register_buffer("position_ids", positions)  # persistent, as in med.py


class Encoder(nn.Module):
    def __init__(self, med: dict[str, Any], encoder_width: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            Layer(med, encoder_width) for _ in range(med["num_hidden_layers"])
        )


class BertModel(nn.Module):
    def __init__(self, med: dict[str, Any], encoder_width: int) -> None:
        super().__init__()
        self.embeddings = Embeddings(med)
        self.encoder = Encoder(med, encoder_width)

    def forward(self, ids: Any, mask: Any, image: Any) -> Any:
        positions = self.embeddings.position_ids[:, : ids.shape[1]]
        hidden = self.embeddings.word_embeddings(ids) + self.embeddings.position_embeddings(
            positions
        )
        hidden = self.embeddings.LayerNorm(hidden)
        mask = (1.0 - mask[:, None, None, :].float()) * -10000.0
        image_mask = torch.zeros(image.shape[0], 1, 1, image.shape[1])  # all image tokens
        for layer in self.encoder.layer:
            hidden = layer(hidden, mask, image, image_mask)
        return hidden


class Blip(nn.Module):
    def __init__(self, med: dict[str, Any], vision: dict[str, int]) -> None:
        super().__init__()
        width = vision["width"]
        self.visual_encoder = VisionTransformer(
            img_size=vision["image"],
            patch_size=vision["patch"],
            embed_dim=width,
            depth=vision["depth"],
            num_heads=vision["heads"],
            mlp_ratio=4.0,
            qkv_bias=True,
            num_classes=0,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )
        self.text_encoder = BertModel(med, encoder_width=width)  # BLIP_Pretrain's override
        self.vision_proj = nn.Linear(width, 256)
        self.text_proj = nn.Linear(med["hidden_size"], 256)


class Head(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )  # fmt: skip


class OriginalImageReward(nn.Module):
    """ImageReward(med_config): blip = BLIP_Pretrain(224, "large"), mlp = MLP(768)."""

    def __init__(self, med: dict[str, Any], vision: dict[str, int]) -> None:
        super().__init__()
        self.blip = Blip(med, vision)
        self.mlp = Head(med["hidden_size"])

    def score(self, pixels: Any, ids: Any, mask: Any) -> Any:
        """ImageReward.score()/inference_rank(): (mlp([CLS]) - mean) / std."""
        image = self.blip.visual_encoder.forward_features(pixels)
        cls = self.blip.text_encoder(ids, mask, image)[:, 0, :].float()
        return ((self.mlp.layers(cls) - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)
