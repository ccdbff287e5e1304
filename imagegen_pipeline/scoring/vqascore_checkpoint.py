"""CLIP-FlanT5's checkpoint: where its files are, and how its tensors become the T5, the vision
tower and the projector (``vqascore.py`` scores with them)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

# Probed in this order: the hub's main branch has only the pickle (read with weights_only).
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)

# Checkpoint keys: the attributes of CLIPT5ForConditionalGeneration. Its CLIPVisionTower wraps
# a CLIPVisionModel as `.vision_tower`, whose transformers-4 keys start with `vision_model.`
# (transformers 5 drops that prefix: conversion_mapping's PrefixChange for CLIPVisionModel).
VISION_PREFIX = "vision_tower.vision_tower.vision_model."
PROJECTOR_PREFIX = "mm_projector."
# Names of T5's one token embedding: `shared` and its aliases, the encoder's, the decoder's
# and CLIPT5's own `self.embed_tokens = self.encoder.embed_tokens`. A torch.save'd checkpoint
# has them all (one storage); a safetensors conversion keeps one of them.
EMBEDDING_NAMES = (
    "shared.weight",
    *(f"{p}embed_tokens.weight" for p in ("", "encoder.", "decoder.")),
)
# Constant buffers older transformers saved and that are rebuilt, not loaded.
IGNORED_KEYS = frozenset({f"{VISION_PREFIX}embeddings.position_ids"})


def hub_file(model: str, name: str, hub: dict[str, Any], required: bool = True) -> str | None:
    """``name`` from a model folder or the hub (cache), as transformers resolves it."""
    from transformers.utils import cached_file

    return cached_file(model, name, _raise_exceptions_for_missing_entries=required, **hub)


def checkpoint_files(model: str, hub: dict[str, Any]) -> list[str]:
    """The checkpoint's files: the first of WEIGHT_FILES present, shards through the index."""
    for name in WEIGHT_FILES:
        found = hub_file(model, name, hub, required=False)
        if found is None:
            continue
        if not name.endswith(".index.json"):
            return [found]
        weight_map = json.loads(Path(found).read_text(encoding="utf-8"))["weight_map"]
        return [str(hub_file(model, shard, hub)) for shard in sorted(set(weight_map.values()))]
    raise OSError(f"none of {', '.join(WEIGHT_FILES)} in {model}")


def read_state(files: list[str]) -> dict[str, Any]:
    """Every tensor of the checkpoint's files, by name."""
    import torch
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for file in files:
        if file.endswith(".safetensors"):
            state |= load_file(file)
        else:  # memory-mapped, so a 6-22 GB pickle is not read into memory twice
            state |= torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    return state


def build_projector(config: dict[str, Any], width: int) -> Any:
    """The source's build_vision_projector: `linear` or `mlp<N>x_gelu`."""
    from torch import nn

    kind = config.get("mm_projector_type", "linear")
    if kind == "linear":
        return nn.Linear(config["mm_hidden_size"], width)
    depth = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if depth is None:
        raise ValueError(f"unknown mm_projector_type {kind!r}")
    layers: list[nn.Module] = [nn.Linear(config["mm_hidden_size"], width)]
    for _ in range(1, int(depth.group(1))):
        layers += [nn.GELU(), nn.Linear(width, width)]
    return nn.Sequential(*layers)


def split_checkpoint(state: dict[str, Any], dtype: Any) -> tuple[dict[str, Any], ...]:
    """The checkpoint's tensors (in ``dtype``) per module: T5, vision tower, projector. Every
    key is claimed: embedding aliases must equal the one embedding kept as ``shared.weight``,
    IGNORED_KEYS are dropped, anything else left over fails T5's strict load."""
    import torch

    embedding = next((state[name] for name in EMBEDDING_NAMES if name in state), None)
    if embedding is None:
        raise ValueError("the checkpoint has no token embedding (shared.weight)")
    t5: dict[str, Any] = {"shared.weight": embedding.to(dtype)}
    vision: dict[str, Any] = {}
    projector: dict[str, Any] = {}
    for key, tensor in state.items():
        if key in IGNORED_KEYS:
            continue
        if key in EMBEDDING_NAMES:
            if not torch.equal(tensor, embedding):
                raise ValueError(f"{key} differs from the token embedding: not CLIP-T5 weights")
        elif key.startswith(VISION_PREFIX):
            vision[key.removeprefix(VISION_PREFIX)] = tensor.to(dtype)
        elif key.startswith(PROJECTOR_PREFIX):
            projector[key.removeprefix(PROJECTOR_PREFIX)] = tensor.to(dtype)
        else:
            t5[key] = tensor.to(dtype)
    return t5, vision, projector


def assemble(raw: dict[str, Any], vision_config: Any, state: dict[str, Any], dtype: Any) -> Any:
    """T5, vision tower and projector with the checkpoint's weights, loaded strictly."""
    import torch
    from accelerate import init_empty_weights
    from transformers import CLIPVisionModel, T5Config, T5ForConditionalGeneration

    config = T5Config.from_dict(raw)  # tie_word_embeddings false: Flan-T5's own lm_head
    # Parameters on the meta device (the checkpoint replaces them all: no 3B random init);
    # buffers real, since CLIP's position ids are rebuilt, not loaded.
    with init_empty_weights(include_buffers=False):
        t5 = T5ForConditionalGeneration(config)
        vision = CLIPVisionModel(vision_config)
        projector = build_projector(raw, config.d_model)
    t5_state, vision_state, projector_state = split_checkpoint(state, dtype)
    missing, unexpected = t5.load_state_dict(t5_state, strict=False, assign=True)
    tied = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    if set(missing) != tied or unexpected:
        raise ValueError(f"CLIP-T5 checkpoint: missing {missing}, unexpected {unexpected}")
    # Encoder and decoder read the one embedding; lm_head keeps its own (assigned above).
    t5.encoder.embed_tokens.weight = t5.decoder.embed_tokens.weight = t5.shared.weight
    vision.load_state_dict(vision_state, strict=True, assign=True)
    projector.load_state_dict(projector_state, strict=True, assign=True)
    modules = {"t5": t5, "vision_tower": vision, "mm_projector": projector}
    return torch.nn.ModuleDict(modules).requires_grad_(False)


def kept_elements(sizes: dict[str, int]) -> int:
    """The tensor elements split_checkpoint keeps of a checkpoint's (name: elements): the
    token embedding once (the file may store its aliases too), no ignored keys."""
    embedding = next((sizes[name] for name in EMBEDDING_NAMES if name in sizes), 0)
    dropped = {*EMBEDDING_NAMES, *IGNORED_KEYS}
    return embedding + sum(n for name, n in sizes.items() if name not in dropped)
