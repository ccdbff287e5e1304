"""FLUX.1-schnell: a 12B rectified-flow transformer distilled to 4 steps without guidance."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import FluxPipeline

from imagegen_pipeline.backends.base import ImageRequest
from imagegen_pipeline.backends.diffusers_backend import DiffusersConfig, DiffusersImageBackend
from imagegen_pipeline.enhancement.base import T5_TOKEN_LIMIT


@dataclass
class FluxSchnellConfig(DiffusersConfig):
    """FLUX.1-schnell defaults: bf16, 4 steps, no guidance, T5 prompts of up to 256 tokens."""

    model: str = "black-forest-labs/FLUX.1-schnell"
    steps: int = 4
    guidance: float = 0.0
    max_sequence_length: int = T5_TOKEN_LIMIT


class FluxSchnellBackend(DiffusersImageBackend):
    """FluxPipeline from the black-forest-labs/FLUX.1-schnell layout."""

    name = "flux_schnell"
    pipeline_class = FluxPipeline
    preferred_dtype = torch.bfloat16
    default_width = 1024
    default_height = 1024
    token_limit = T5_TOKEN_LIMIT
    # Schnell is guidance-distilled: it has no classifier-free guidance to use a negative prompt.
    supports_negative_prompt = False

    config: FluxSchnellConfig

    def pipeline_kwargs(self, batch: Sequence[ImageRequest]) -> dict[str, Any]:
        return {"max_sequence_length": self.config.max_sequence_length}
