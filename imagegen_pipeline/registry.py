"""Every model the pipeline knows, in one table: names, repos, variables, weights, tiny builds.

The CSV reader, the partitions, the sensors and schedule, the CLI, the resources, ``imagegen
models pull`` and the tiny models all read this table; adding an image backend is its module,
its settings class and one entry in ``IMAGE_BACKENDS``. Implementations are named by import path
and imported only when a step needs one, so loading the Dagster definitions never imports torch.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from imagegen_pipeline.model_settings import (
    ClipModelSettings,
    FluxSchnellSettings,
    GeminiSettings,
    SdxlTurboSettings,
    SvdSettings,
)


@dataclass(frozen=True)
class WeightSource:
    """The files of a hub repo that the pipeline loads (what ``imagegen models pull`` fetches)."""

    repo_id: str
    allow_patterns: tuple[str, ...] | None = None
    ignore_patterns: tuple[str, ...] | None = None
    open_clip_tag: tuple[str, str] | None = None  # (model, pretrained) fetched by open_clip itself


@dataclass(frozen=True)
class ModelSpec:
    """One model: what it is called, where its weights come from, how it is built tiny."""

    name: str  # resource key, and for image backends the partition key and CSV value
    role: Literal["image", "video", "scoring"]
    implementation: str  # "module:Class", imported lazily by ``implementation_class``
    settings: type[BaseModel]  # its knobs (model_settings.py); the resource derives from it
    default_model: str  # what "auto" means when real weights are present (or the API model)
    model_env_var: str | None = None  # overrides "auto" with a repo id or a local folder
    weights: WeightSource | None = None  # None: nothing to download (a hosted API)
    tiny_model: str | None = None  # tiny_models.TINY_MODELS builder used when weights are absent
    key_env_var: str | None = None  # an API key the backend cannot run without
    runs_on: Literal["gpu", "api"] = "gpu"  # gpu: holds a slot of the gpu pool while it works
    # Settings left at None are filled from these: the model card's values, and the ones that
    # keep the tiny random-weight stand-in fast on a CPU (its pictures are noise anyway).
    defaults: dict[str, Any] = field(default_factory=dict)
    tiny_defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        """True when the model runs on this machine's accelerator."""
        return self.runs_on == "gpu"

    def has_key(self) -> bool:
        """True when the backend needs no key or its key is set in the environment."""
        return self.key_env_var is None or bool(os.getenv(self.key_env_var, "").strip())


# Tiny images and clips: the tiny models draw noise, so small sizes keep every entry point
# (demo, UI, tests) fast on a CPU without changing any code path.
TINY_IMAGE_SIDE = 256

IMAGE_BACKENDS: tuple[ModelSpec, ...] = (
    ModelSpec(
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
        tiny_model="flux_schnell",
        defaults={"width": 1024, "height": 1024},
        tiny_defaults={"width": TINY_IMAGE_SIDE, "height": TINY_IMAGE_SIDE},
    ),
    ModelSpec(
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
        tiny_model="sdxl_turbo",
        defaults={"width": 512, "height": 512},
        tiny_defaults={"width": TINY_IMAGE_SIDE, "height": TINY_IMAGE_SIDE},
    ),
    ModelSpec(
        name="gemini",
        role="image",
        implementation="imagegen_pipeline.backends.gemini:GeminiBackend",
        settings=GeminiSettings,
        default_model="gemini-2.5-flash-image",
        key_env_var="GEMINI_API_KEY",
        runs_on="api",
    ),
)

SVD = ModelSpec(
    name="svd",
    role="video",
    implementation="imagegen_pipeline.video.svd:SvdGenerator",
    settings=SvdSettings,
    default_model="stabilityai/stable-video-diffusion-img2vid-xt",
    model_env_var="IMAGEGEN_SVD_MODEL",
    weights=WeightSource(
        "stabilityai/stable-video-diffusion-img2vid-xt",
        allow_patterns=("*.json", "*.txt", "*.fp16.safetensors"),
    ),
    tiny_model="svd_xt",
    defaults={
        "width": 1024,
        "height": 576,
        "num_frames": 25,
        "steps": 25,
        "decode_chunk_size": 8,
        "max_guidance_scale": 3.0,
    },
    # 64 px is the tiny SVD's smallest side; without guidance the UNet runs once per step.
    tiny_defaults={
        "width": 64,
        "height": 64,
        "num_frames": 4,
        "steps": 2,
        "decode_chunk_size": 4,
        "max_guidance_scale": 1.0,
    },
)

CLIP_MODEL = ModelSpec(
    name="clip_model",
    role="scoring",
    implementation="imagegen_pipeline.scoring.clip_model:ClipModel",
    settings=ClipModelSettings,
    # ViT-L-14 with OpenAI's weights: the model CLIPScore and the LAION aesthetic head use.
    default_model="ViT-L-14",
    model_env_var="IMAGEGEN_CLIP_MODEL",
    weights=WeightSource(
        "timm/vit_large_patch14_clip_224.openai", open_clip_tag=("ViT-L-14", "openai")
    ),
    tiny_model="open_clip_vit_l_14",
)

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (*IMAGE_BACKENDS, SVD, CLIP_MODEL)}
BACKEND_NAMES: tuple[str, ...] = tuple(spec.name for spec in IMAGE_BACKENDS)
LOCAL_BACKEND_NAMES: tuple[str, ...] = tuple(s.name for s in IMAGE_BACKENDS if s.is_local)


def backend_spec(name: str) -> ModelSpec:
    """The registry entry of image backend ``name``; a clear error for unknown names."""
    for spec in IMAGE_BACKENDS:
        if spec.name == name:
            return spec
    raise KeyError(f"unknown image backend {name!r}; known: {', '.join(BACKEND_NAMES)}")


def enabled_backends(names: tuple[str, ...] | list[str] | None = None) -> list[str]:
    """Backends that generate automatically: ``names`` (default all) that have their key."""
    wanted = BACKEND_NAMES if names is None else tuple(names)
    return [spec.name for spec in IMAGE_BACKENDS if spec.name in wanted and spec.has_key()]


def implementation_class(spec: ModelSpec) -> type:
    """The class that implements ``spec``, imported now (torch and friends load here)."""
    module_name, _, class_name = spec.implementation.partition(":")
    return getattr(importlib.import_module(module_name), class_name)
