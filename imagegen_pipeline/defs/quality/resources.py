"""The CLIP scorer and the quality thresholds as Dagster resources."""

from typing import Literal

import dagster as dg

from imagegen_pipeline.model_weights import OPEN_CLIP_DEFAULT
from imagegen_pipeline.scoring.clip_scorer import ClipScorer, ClipScorerConfig
from imagegen_pipeline.scoring.perceptual import BlankThresholds


class ClipScorerResource(dg.ConfigurableResource):
    """open_clip ViT-L-14 (OpenAI weights) by default: the CLIPScore and LAION-aesthetic model."""

    model: str = OPEN_CLIP_DEFAULT[0]  # open_clip name, "local-dir:<folder>", or "hf-hub:<repo>"
    pretrained: str | None = OPEN_CLIP_DEFAULT[1]  # weights tag of the model name
    checkpoint: str | None = None  # local weights file of the model name (instead of the cache)
    quick_gelu: bool | None = None  # None: as the tag says (OpenAI weights need QuickGELU)
    device: str = "auto"  # "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"  # fp32 keeps scores comparable
    batch_size: int = 32  # images per forward pass; scores do not depend on it
    workers: int = 4  # threads decoding and measuring images ahead of the model
    aesthetic_head: str | None = None  # LAION linear head weights for laion_aesthetic
    allow_download: bool = False  # let a step download missing weights (else: a clear error)

    def create_scorer(self) -> ClipScorer:
        """A scorer with this configuration, not yet loaded."""
        return ClipScorer(
            ClipScorerConfig(
                model=self.model,
                pretrained=self.pretrained,
                checkpoint=self.checkpoint,
                quick_gelu=self.quick_gelu,
                device=self.device,
                precision=self.precision,
                batch_size=self.batch_size,
                aesthetic_head=self.aesthetic_head,
                allow_download=self.allow_download,
            )
        )


class QualityThresholds(dg.ConfigurableResource):
    """What the quality checks accept. CLIP scores are CLIPScore (0-100) on ViT-L-14/openai:
    matching image-text pairs typically score 25-35, unrelated ones below 20."""

    min_clip_score: float = 20.0  # an image below this does not show its prompt
    max_low_score_share: float = 0.25  # WARN when more images than this score below the minimum
    blank_max_luminance_std: float = 0.02  # blank: luminance std (0-1) below this ...
    blank_max_dominant_share: float = 0.98  # ... or one colour covering more than this share

    def blank_thresholds(self) -> BlankThresholds:
        """The blank-image detector's settings."""
        return BlankThresholds(
            max_luminance_std=self.blank_max_luminance_std,
            max_dominant_share=self.blank_max_dominant_share,
        )
