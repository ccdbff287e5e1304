"""What the quality checks accept, as a Dagster resource."""

import dagster as dg

from imagegen_pipeline.scoring.perceptual import DEFAULT_BLANK_THRESHOLDS, BlankThresholds


class QualityThresholds(dg.ConfigurableResource):
    """What the quality checks accept. CLIP scores are CLIPScore (0-100) on ViT-L-14/openai:
    matching image-text pairs typically score 25-35, unrelated ones below 20."""

    min_clip_score: float = 20.0  # an image below this does not show its prompt
    max_low_score_share: float = 0.25  # WARN when more images than this score below the minimum
    # Blank: luminance std (0-1) below the first, or one colour covering more than the second
    # share of the pixels; the defaults (and why) are the detector's own, in perceptual.py.
    blank_max_luminance_std: float = DEFAULT_BLANK_THRESHOLDS.max_luminance_std
    blank_max_dominant_share: float = DEFAULT_BLANK_THRESHOLDS.max_dominant_share

    def blank_thresholds(self) -> BlankThresholds:
        """The blank-image detector's settings."""
        return BlankThresholds(
            max_luminance_std=self.blank_max_luminance_std,
            max_dominant_share=self.blank_max_dominant_share,
        )
