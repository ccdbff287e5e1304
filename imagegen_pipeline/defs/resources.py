"""The project's resources, configured from the environment where a user overrides a default."""

import os

from imagegen_pipeline.defs.images.resources import FluxSchnellResource, SdxlTurboResource
from imagegen_pipeline.defs.prompts.resources import PromptEnhancerResource
from imagegen_pipeline.defs.storage import ParquetIOManager, StorageResource


def default_resources() -> dict:
    """Resources for ``dagster dev`` and the demo; IMAGEGEN_* variables override defaults."""
    storage = StorageResource(
        prompts_dir=os.getenv("IMAGEGEN_PROMPTS_DIR", "prompts"),
        base_dir=os.getenv("IMAGEGEN_STORAGE_DIR", "storage"),
    )
    return {
        "storage": storage,
        "io_manager": ParquetIOManager(storage=storage),
        "enhancer": PromptEnhancerResource(),
        "flux_schnell": FluxSchnellResource(
            model=os.getenv("IMAGEGEN_FLUX_SCHNELL_MODEL", "black-forest-labs/FLUX.1-schnell")
        ),
        "sdxl_turbo": SdxlTurboResource(
            model=os.getenv("IMAGEGEN_SDXL_TURBO_MODEL", "stabilityai/sdxl-turbo")
        ),
    }
