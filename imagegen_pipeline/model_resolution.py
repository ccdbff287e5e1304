"""Turn settings that say "auto" into what a step loads, the same way at every entry point.

``model="auto"`` becomes the model's ``IMAGEGEN_*_MODEL`` variable or ``imagegen.toml`` entry,
else the real weights when they are in the Hugging Face cache, else the tiny random-weight
stand-in, built once and announced loudly. Settings left at ``None`` take the registry's
defaults for what was chosen: the model card's sizes for real weights, small fast ones for the
tiny stand-ins, so a CPU-only machine finishes in seconds whichever entry point started the run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from imagegen_pipeline.model_cache import WARM_MODELS
from imagegen_pipeline.model_settings import LOCAL_DIR
from imagegen_pipeline.model_spec import ModelSpec
from imagegen_pipeline.model_weights import is_cached
from imagegen_pipeline.project_config import ProjectConfig, api_key
from imagegen_pipeline.tiny_models import build_tiny_model, is_tiny_model


@dataclass(frozen=True)
class ResolvedModel:
    """What "auto" became for one model."""

    name: str
    model: str  # what the loader is given: repo id, folder, or "local-dir:<folder>"
    model_id: str  # what content addresses and metadata record; the same on every machine
    is_tiny: bool
    notice: str = ""  # a line to log loudly when a tiny stand-in replaces the real weights


def weights_present(spec: ModelSpec, revision: str | None = None) -> bool:
    """True when ``spec``'s real weights are in this machine's Hugging Face cache."""
    if spec.weights is None:
        return True  # a hosted API: nothing to download
    if spec.weights.open_clip_tag is None:
        sources = [spec.weights, *spec.weights.companions]
        return is_cached(spec.weights.repo_id, revision, spec.weights.index_file) and all(
            is_cached(source.repo_id, None, source.index_file) for source in sources[1:]
        )
    from huggingface_hub import try_to_load_from_cache

    names = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    return any(
        isinstance(try_to_load_from_cache(spec.weights.repo_id, name), str) for name in names
    )


def resolve_model(spec: ModelSpec, configured: str, project: ProjectConfig) -> ResolvedModel:
    """The model ``configured`` ("auto", a repo id or a folder) stands for on this machine."""
    choice = project.model_for(spec) if configured == "auto" else configured
    if choice != "auto":
        folder = Path(choice.removeprefix(LOCAL_DIR)).expanduser()
        tiny = folder.is_dir() and is_tiny_model(folder)
        if tiny and spec.role == "scoring" and not choice.startswith(LOCAL_DIR):
            choice = f"{LOCAL_DIR}{folder}"
        return ResolvedModel(spec.name, choice, choice, tiny)
    if weights_present(spec) or spec.tiny_builder is None:
        return ResolvedModel(spec.name, spec.default_model, spec.default_model, False)
    folder = build_tiny_model(spec, project.tiny_models_dir)
    model = f"{LOCAL_DIR}{folder}" if spec.role == "scoring" else str(folder)
    notice = (
        f"{spec.name}: no real weights on this machine, so a TINY RANDOM-WEIGHT stand-in is "
        f"used ({folder}): its output is noise. `imagegen models pull {spec.name}` on a machine "
        f"that reaches the Hugging Face Hub fetches the real {spec.default_model}."
    )
    # The stand-in's id names what it stands in for, not where this machine built it, so its
    # content addresses agree across machines (the build is deterministic).
    return ResolvedModel(spec.name, model, f"tiny-random/{spec.default_model}", True, notice)


def resolve_settings(
    spec: ModelSpec, settings: BaseModel, project: ProjectConfig
) -> tuple[Any, ResolvedModel | None]:
    """``settings`` with every "auto"/None filled in, and what the model resolved to."""
    values = settings.model_dump()
    resolved = None
    if spec.is_local:  # a hosted model (Gemini) is named, not loaded
        resolved = resolve_model(spec, values["model"], project)
        values["model"] = resolved.model
        if resolved.model == spec.default_model and values.get("revision") is None:
            values["revision"] = spec.revision  # the real weights, at the spec's pinned revision
    if values.get("device") == "auto":
        values["device"] = project.device
    defaults = spec.tiny_defaults if resolved and resolved.is_tiny else spec.defaults
    for name, value in defaults.items():
        if values.get(name) is None:
            values[name] = value
    if "api_key" in values and not values["api_key"] and spec.key_env_var:
        values["api_key"] = api_key(spec.key_env_var)
    return type(settings).model_validate(values), resolved


class InvalidModelSettings(ValueError):
    """Settings the model refuses when it is created (a size it cannot run, no API key)."""


@dataclass
class WarmModel:
    """A model of this process's warm cache, with the settings it was resolved to.

    The model object is created on first use of ``model``: creating it imports its module
    (torch, diffusers, open_clip: seconds), which a step whose outputs all exist never needs.
    """

    spec: ModelSpec
    settings: Any
    resolved: ResolvedModel | None
    _key: str
    _create: Callable[[], Any]
    _model: Any = None
    cache_hit: bool | None = None  # once created: the same configuration was already cached

    @property
    def model_id(self) -> str:
        """What content addresses and metadata record; the same on every machine."""
        return self.resolved.model_id if self.resolved else str(self.settings.model)

    @property
    def model(self) -> Any:
        """The model object, from the warm cache or created now (not loaded: that is the
        model's own ``load``)."""
        if self._model is None:
            try:
                self._model, self.cache_hit = WARM_MODELS.get(
                    self.spec.name, self._key, self._create
                )
            except ValueError as error:
                raise InvalidModelSettings(str(error)) from None
        return self._model

    @property
    def created(self) -> bool:
        """Whether this step has asked for the model object."""
        return self._model is not None

    @property
    def device(self) -> str | None:
        """Where the model runs; None while this step has not needed it."""
        return None if self._model is None else str(self._model.device)


def warm_model(spec: ModelSpec, settings: BaseModel, project: ProjectConfig) -> WarmModel:
    """``spec``'s model for ``settings``, resolved now and taken from (or added to) the warm
    cache when the step first uses it."""
    concrete, resolved = resolve_settings(spec, settings, project)

    def create() -> Any:
        model_class = spec.implementation_class()
        if resolved is None:  # a hosted API: nothing to resolve or identify
            return model_class(concrete)
        return model_class(concrete, model_id=resolved.model_id)

    # The full configuration is the key: any change of model, precision, offload or size
    # means other weights or another placement, so the old model is freed first. Hashed, so
    # an API key in the settings never sits in the cache in clear.
    key = hashlib.sha256(concrete.model_dump_json().encode()).hexdigest()
    return WarmModel(spec, concrete, resolved, key, create)
