"""SDXL-Turbo: SDXL distilled (adversarial diffusion distillation) to 1-4 steps at 512 px."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline

from imagegen_pipeline.backends.base import ImageRequest
from imagegen_pipeline.backends.diffusers_backend import DiffusersConfig, DiffusersImageBackend
from imagegen_pipeline.enhancement.base import CLIP_TOKEN_LIMIT


@dataclass
class SdxlTurboConfig(DiffusersConfig):
    """SDXL-Turbo defaults: the fp16 weights, 1 step, guidance 0 as the model card says."""

    model: str = "stabilityai/sdxl-turbo"
    steps: int = 1
    guidance: float = 0.0


class SdxlTurboBackend(DiffusersImageBackend):
    """StableDiffusionXLPipeline from the stabilityai/sdxl-turbo layout."""

    name = "sdxl_turbo"
    pipeline_class = StableDiffusionXLPipeline
    preferred_dtype = torch.float16
    variant = "fp16"
    default_width = 512
    default_height = 512
    token_limit = CLIP_TOKEN_LIMIT

    config: SdxlTurboConfig

    @property
    def supports_negative_prompt(self) -> bool:  # type: ignore[override]
        # The negative prompt only acts through classifier-free guidance, i.e. guidance > 1.
        return self.config.guidance > 1.0

    def pipeline_kwargs(self, batch: Sequence[ImageRequest]) -> dict[str, Any]:
        if not self.supports_negative_prompt:
            return {}
        return {"negative_prompt": [request.negative_prompt for request in batch]}
