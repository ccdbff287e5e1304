"""What a model module declares about itself: one ``ModelSpec``, beside the model's code.

Each backend, video model and scorer module ends with ``SPEC = ModelSpec(...)``: its name, its
settings class, where its weights come from, its sizes and precision, how its memory is
estimated and how its tiny stand-in is built. ``registry.py`` only lists those modules (and
finds the specs other installed packages declare through an entry point), so nothing else in
the project names a backend. This module imports nothing heavier than pydantic, so reading a
spec never imports torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from pydantic import BaseModel


@dataclass(frozen=True)
class WeightSource:
    """The files of a hub repo that the pipeline loads (what ``imagegen models pull`` fetches)."""

    repo_id: str
    allow_patterns: tuple[str, ...] | None = None
    ignore_patterns: tuple[str, ...] | None = None
    open_clip_tag: tuple[str, str] | None = None  # (model, pretrained) fetched by open_clip itself
    # The file whose presence in the Hugging Face cache says the weights were pulled.
    index_file: str = "model_index.json"
    # Other repos the model reads files from (a scorer's processor), pulled with it.
    companions: tuple[WeightSource, ...] = ()


# (component config, width, height, text tokens, pixels per latent cell, bytes per element)
# -> activation bytes of one image in that component. See memory_estimates.py.
ActivationEstimate = Callable[..., int]


@dataclass(frozen=True)
class MemoryHooks:
    """How the memory planner sizes a diffusers pipeline of this model before loading it."""

    # Per pipeline component (its folder name in model_index.json): its activation estimate.
    # A component with weights but no estimate makes the planner refuse (batch 1, no offload).
    activations: Mapping[str, ActivationEstimate]
    # SDXL pipelines decode an fp16 VAE marked force_upcast in float32 (fp16 overflows there).
    upcast_vae: bool = False
    # The settings field holding the T5 tokens the transformer attends to (FLUX), if any.
    text_tokens_setting: str | None = None


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class ModelSpec:
    """One model: its name and settings, its weights, sizes, precision, memory and tiny build."""

    name: str  # resource key; for image backends the partition key and CSV value too
    role: Literal["image", "video", "scoring"]
    implementation: str  # "module:Class", imported only when a step needs the model
    settings: type[BaseModel]  # its knobs; the Dagster resource is derived from this class
    default_model: str  # what "auto" means when real weights are present (or the API model)
    revision: str | None = None  # the default model's pinned branch, tag or commit; None: main
    model_env_var: str | None = None  # IMAGEGEN_<NAME>_MODEL: a repo id or a folder for "auto"
    weights: WeightSource | None = None  # None: nothing to download (a hosted API)
    key_env_var: str | None = None  # an API key the backend cannot run without
    runs_on: Literal["gpu", "api"] = "gpu"  # gpu: holds a slot of the gpu pool while it works
    dtype: str = "float32"  # its own precision on an accelerator (float32 on a CPU regardless)
    variant: str | None = None  # weight-file variant the repo ships ("fp16"), if any
    # Settings left at None are filled from these: the model card's values, and the ones that
    # keep the tiny random-weight stand-in fast on a CPU (its pictures are noise anyway).
    defaults: Mapping[str, Any] = field(default_factory=dict)
    tiny_defaults: Mapping[str, Any] = field(default_factory=dict)
    # Writes the tiny stand-in into an empty folder, in the real repo's layout.
    tiny_builder: Callable[[Path], None] | None = None
    memory: MemoryHooks | None = None  # None: offload and batch size are set by hand
    # Pipeline components a LoRA may adapt; empty: the model takes no LoRA (a hosted API).
    lora_components: tuple[str, ...] = ()
    # The ControlNet repo per control type (canny, depth, pose); the `controlnets` setting
    # replaces the types it names. Empty: the model takes no ControlNet.
    controlnets: Mapping[str, str] = field(default_factory=dict)
    # Settings a prompt set's sidecar may change for that set alone (a ``[<name>]`` table).
    per_set_settings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", _frozen(self.defaults))
        object.__setattr__(self, "tiny_defaults", _frozen(self.tiny_defaults))
        object.__setattr__(self, "controlnets", _frozen(self.controlnets))

    @property
    def is_local(self) -> bool:
        """True when the model runs on this machine's accelerator."""
        return self.runs_on == "gpu"

    @property
    def tiny_dir_name(self) -> str:
        """The tiny stand-in's folder name: the real repo's, so paths read the same."""
        return self.default_model.rsplit("/", 1)[-1]

    def implementation_class(self) -> type:
        """The class that implements the model, imported now (torch and friends load here)."""
        module_name, _, class_name = self.implementation.partition(":")
        return getattr(importlib.import_module(module_name), class_name)
