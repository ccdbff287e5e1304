"""FLUX.1-schnell: a 12B rectified-flow transformer distilled to 4 steps without guidance."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imagegen_pipeline.backends.base import ImageRequest
from imagegen_pipeline.backends.diffusers_text_to_image import DiffusersTextToImage
from imagegen_pipeline.model_settings import FluxSchnellSettings


class FluxSchnellBackend(DiffusersTextToImage):
    """FluxPipeline from the black-forest-labs/FLUX.1-schnell layout."""

    name = "flux_schnell"
    pipeline_class_name = "FluxPipeline"
    preferred_dtype = "bfloat16"

    config: FluxSchnellSettings

    def pipeline_kwargs(self, batch: Sequence[ImageRequest]) -> dict[str, Any]:
        return {"max_sequence_length": self.config.max_sequence_length}
