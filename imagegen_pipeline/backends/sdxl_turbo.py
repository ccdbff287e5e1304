"""SDXL-Turbo: SDXL distilled (adversarial diffusion distillation) to 1-4 steps at 512 px."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imagegen_pipeline.backends.base import ImageRequest
from imagegen_pipeline.backends.diffusers_text_to_image import DiffusersTextToImage
from imagegen_pipeline.model_settings import SdxlTurboSettings


class SdxlTurboBackend(DiffusersTextToImage):
    """StableDiffusionXLPipeline from the stabilityai/sdxl-turbo layout."""

    name = "sdxl_turbo"
    pipeline_class_name = "StableDiffusionXLPipeline"
    preferred_dtype = "float16"
    variant = "fp16"  # the repo ships fp16 files; the fp32 ones are twice the download

    config: SdxlTurboSettings

    def pipeline_kwargs(self, batch: Sequence[ImageRequest]) -> dict[str, Any]:
        if not self.supports_negative_prompt:
            return {}
        return {"negative_prompt": [request.negative_prompt for request in batch]}
