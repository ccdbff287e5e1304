"""Every model the pipeline knows: the modules that declare one, and the installed plugins.

A model module declares everything about its model in one ``SPEC`` (``model_spec.ModelSpec``);
this registry only lists those modules, and adds the image backends that other installed
packages declare under the ``imagegen_pipeline.backends`` entry-point group, e.g. in a plugin's
pyproject.toml::

    [project.entry-points."imagegen_pipeline.backends"]
    sd15 = "my_studio_backends.sd15:SPEC"

The CSV reader, the partitions, the sensors and schedule, the CLI, the resources, ``imagegen
models pull``, the demo and the comparison all read these tables, so a new backend needs its
module and nothing else. Specs are light (no torch); implementations are imported when a step
needs one.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from importlib.metadata import entry_points

from imagegen_pipeline.model_spec import ModelSpec, WeightSource
from imagegen_pipeline.project_config import ConfigError, ProjectConfig, api_key

__all__ = [
    "ANY_BACKEND",
    "BACKEND_NAMES",
    "CLIP_MODEL",
    "IMAGE_BACKENDS",
    "LOCAL_BACKEND_NAMES",
    "MODELS",
    "SCORERS",
    "SVD",
    "ModelSpec",
    "WeightSource",
    "backend_spec",
    "configured_backends",
    "enabled_backends",
    "has_key",
    "implementation_class",
    "project_backends",
    "scorer_spec",
]

BACKEND_ENTRY_POINT_GROUP = "imagegen_pipeline.backends"
BUILT_IN_BACKENDS = (
    "imagegen_pipeline.backends.flux_schnell",
    "imagegen_pipeline.backends.sdxl_turbo",
    "imagegen_pipeline.backends.gemini",
)
VIDEO_MODEL = "imagegen_pipeline.video.svd"
SCORER = "imagegen_pipeline.scoring.clip_model"
# Best-of-N scorers by the name prompt rows give in their ``scorer`` column.
PREFERENCE_SCORERS = {
    "clip": SCORER,
    "hpsv2": "imagegen_pipeline.scoring.hpsv2",
    "pickscore": "imagegen_pipeline.scoring.pickscore",
    "imagereward": "imagegen_pipeline.scoring.imagereward",
    "vqascore": "imagegen_pipeline.scoring.vqascore",
}


def _spec_of(module_name: str) -> ModelSpec:
    return importlib.import_module(module_name).SPEC


def _plugin_backends() -> list[ModelSpec]:
    """Image backends declared by other installed packages."""
    found = []
    for entry_point in entry_points(group=BACKEND_ENTRY_POINT_GROUP):
        spec = entry_point.load()
        if not isinstance(spec, ModelSpec) or spec.role != "image":
            raise TypeError(
                f"entry point {entry_point.name} = {entry_point.value} in group "
                f"{BACKEND_ENTRY_POINT_GROUP} must be an image-backend ModelSpec"
            )
        found.append(spec)
    return found


def _unique(specs: Iterable[ModelSpec]) -> tuple[ModelSpec, ...]:
    by_name: dict[str, ModelSpec] = {}
    for spec in specs:
        if spec.name in by_name:
            raise ValueError(f"two models are named {spec.name!r}; names must be unique")
        by_name[spec.name] = spec
    return tuple(by_name.values())


IMAGE_BACKENDS: tuple[ModelSpec, ...] = _unique(
    [*(_spec_of(name) for name in BUILT_IN_BACKENDS), *_plugin_backends()]
)
SVD: ModelSpec = _spec_of(VIDEO_MODEL)
CLIP_MODEL: ModelSpec = _spec_of(SCORER)
SCORERS: dict[str, ModelSpec] = {
    name: _spec_of(module) for name, module in PREFERENCE_SCORERS.items()
}

MODELS: dict[str, ModelSpec] = {
    spec.name: spec for spec in _unique([*IMAGE_BACKENDS, SVD, *SCORERS.values()])
}
BACKEND_NAMES: tuple[str, ...] = tuple(spec.name for spec in IMAGE_BACKENDS)
LOCAL_BACKEND_NAMES: tuple[str, ...] = tuple(s.name for s in IMAGE_BACKENDS if s.is_local)
# The CSV ``backends`` value that leaves the choice to the pipeline: a local backend while its
# queue is short, else overflow to the hosted one (hybrid overflow, steps/hybrid.py).
ANY_BACKEND = "any"


def backend_spec(name: str) -> ModelSpec:
    """The registry entry of image backend ``name``; a clear error for unknown names."""
    for spec in IMAGE_BACKENDS:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown image backend {name!r}; known: {', '.join(BACKEND_NAMES)}")


def scorer_spec(name: str) -> ModelSpec:
    """The registry entry of best-of-N scorer ``name``; a clear error for unknown names."""
    if name not in SCORERS:
        raise KeyError(f"unknown scorer {name!r}; known: {', '.join(SCORERS)}")
    return SCORERS[name]


def has_key(spec: ModelSpec) -> bool:
    """True when ``spec`` needs no API key or its key is set."""
    return spec.key_env_var is None or api_key(spec.key_env_var) is not None


def enabled_backends(names: Iterable[str] | None = None) -> list[str]:
    """Backends that generate automatically: ``names`` (default: every registered one) that
    have their key, in the registry's order."""
    wanted = BACKEND_NAMES if names is None else tuple(names)
    return [spec.name for spec in IMAGE_BACKENDS if spec.name in wanted and has_key(spec)]


def configured_backends(project: ProjectConfig) -> list[str]:
    """``backends`` of the project configuration (default: every registered one), checked."""
    if project.backends is None:
        return list(BACKEND_NAMES)
    unknown = sorted(set(project.backends) - set(BACKEND_NAMES))
    if unknown:
        raise ConfigError(
            f"unknown backend(s) {', '.join(unknown)} in `backends` (imagegen.toml or "
            f"IMAGEGEN_BACKENDS); known: {', '.join(BACKEND_NAMES)}"
        )
    return list(project.backends)


def project_backends(project: ProjectConfig) -> list[str]:
    """The backends the sensors and the schedule run: the configured ones that have their key."""
    return enabled_backends(configured_backends(project))


def implementation_class(spec: ModelSpec) -> type:
    """The class that implements ``spec``, imported now (torch and friends load here)."""
    return spec.implementation_class()
