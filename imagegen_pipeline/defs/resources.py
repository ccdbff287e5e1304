"""The project's resources, configured from the environment where a user overrides a default."""

import os
from typing import TypeVar

import dagster as dg

from imagegen_pipeline.defs.clips.resources import SvdResource
from imagegen_pipeline.defs.images.resources import (
    FluxSchnellResource,
    GeminiResource,
    SdxlTurboResource,
)
from imagegen_pipeline.defs.prompts.resources import PromptEnhancerResource
from imagegen_pipeline.defs.quality.resources import ClipScorerResource, QualityThresholds
from imagegen_pipeline.defs.storage import ParquetIOManager, StorageResource


def default_resources() -> dict:
    """Resources for ``dagster dev`` and the demo; IMAGEGEN_* variables override defaults."""
    storage = StorageResource(
        prompts_dir=os.getenv("IMAGEGEN_PROMPTS_DIR", "prompts"),
        base_dir=os.getenv("IMAGEGEN_STORAGE_DIR", "storage"),
    )
    # The key comes from the environment at run time, and only when set: runs of the local
    # backends never need it, and Dagster records the variable's name, never its value.
    gemini_key = dg.EnvVar("GEMINI_API_KEY") if os.getenv("GEMINI_API_KEY") else None
    return {
        "storage": storage,
        "io_manager": ParquetIOManager(storage=storage),
        "enhancer": PromptEnhancerResource(gemini_api_key=gemini_key),
        "flux_schnell": FluxSchnellResource(
            model=os.getenv("IMAGEGEN_FLUX_SCHNELL_MODEL", "black-forest-labs/FLUX.1-schnell")
        ),
        "sdxl_turbo": SdxlTurboResource(
            model=os.getenv("IMAGEGEN_SDXL_TURBO_MODEL", "stabilityai/sdxl-turbo")
        ),
        "gemini": GeminiResource(api_key=gemini_key),
        "svd": SvdResource(
            model=os.getenv("IMAGEGEN_SVD_MODEL", "stabilityai/stable-video-diffusion-img2vid-xt")
        ),
        # An open_clip model name (with its `pretrained` tag), "local-dir:<folder>" or a folder.
        "clip_scorer": ClipScorerResource(model=os.getenv("IMAGEGEN_CLIP_MODEL", "ViT-L-14")),
        "quality_thresholds": QualityThresholds(),
    }


ResourceT = TypeVar("ResourceT", bound=dg.ConfigurableResource | dg.ConfigurableIOManager)


def reconfigured(resource: ResourceT, **changes: object) -> ResourceT:
    """A copy of ``resource`` with some fields changed (pydantic's model_copy skips Dagster's
    config bookkeeping, so the copy is built anew from every field)."""
    fields = {name: getattr(resource, name) for name in type(resource).model_fields}
    return type(resource)(**{**fields, **changes})
