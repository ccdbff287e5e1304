"""Checks of each quality report; thresholds come from the ``quality_thresholds`` resource.

- ``no_blank_images`` (ERROR): no scored image is blank (solid or nearly uniform).
- ``clip_scores_mostly_above_threshold`` (WARN): at most ``max_low_score_share`` of the scored
  images have a CLIP score (vs the original prompt) under ``min_clip_score``.
- ``every_prompt_has_a_scored_image`` (ERROR): each prompt of the partition has at least one
  scored image.

None is blocking: a bad partition is still worth looking at in the comparison gallery.
"""

from functools import partial

import dagster as dg
import pandas as pd

from imagegen_pipeline.defs.checks import (
    every_prompt_has,
    partitioned_check_specs,
    per_partition,
)
from imagegen_pipeline.defs.metadata import markdown_table
from imagegen_pipeline.defs.quality.resources import QualityThresholds

LIST_COLUMNS = ["prompt_id", "image_index", "clip_score", "status", "path"]


def _scored(quality: pd.DataFrame) -> pd.DataFrame:
    return quality[quality["scored"].astype(bool)] if len(quality) else quality


def no_blank_images(quality: pd.DataFrame) -> dg.AssetCheckResult:
    """ERROR when any image is a solid colour or has almost no luminance variation."""
    scored = _scored(quality)
    blank = scored[scored["is_blank"].astype(bool)] if len(scored) else scored
    return dg.AssetCheckResult(
        passed=blank.empty,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "blank_images": len(blank),
            "scored_images": len(scored),
            "blank": markdown_table(blank, [*LIST_COLUMNS, "contrast", "dominant_colour_share"]),
        },
    )


def clip_scores_mostly_above_threshold(
    quality: pd.DataFrame, quality_thresholds: QualityThresholds
) -> dg.AssetCheckResult:
    """WARN when the share of images under ``min_clip_score`` exceeds ``max_low_score_share``."""
    scored = _scored(quality)
    low = (
        scored[scored["clip_score"] < quality_thresholds.min_clip_score] if len(scored) else scored
    )
    share = len(low) / len(scored) if len(scored) else 0.0
    return dg.AssetCheckResult(
        passed=share <= quality_thresholds.max_low_score_share,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "low_score_share": share,
            "low_score_images": len(low),
            "min_clip_score": quality_thresholds.min_clip_score,
            "max_low_score_share": quality_thresholds.max_low_score_share,
            "lowest": markdown_table(
                low.sort_values("clip_score") if len(low) else low, LIST_COLUMNS
            ),
        },
    )


def every_prompt_has_a_scored_image(quality: pd.DataFrame) -> dg.AssetCheckResult:
    """ERROR when a prompt of the partition ended with no image that could be scored."""
    scored = _scored(quality) if len(quality) else quality.head(0)
    columns = ["prompt_id", "image_index", "status", "error"]
    return every_prompt_has(quality, scored, "scored_image", columns)


QUALITY_CHECKS = {
    "no_blank_images": no_blank_images,
    "clip_scores_mostly_above_threshold": clip_scores_mostly_above_threshold,
    "every_prompt_has_a_scored_image": every_prompt_has_a_scored_image,
}


@dg.multi_asset_check(specs=partitioned_check_specs("quality", QUALITY_CHECKS), can_subset=True)
def quality_checks(quality: dict[str, pd.DataFrame], quality_thresholds: QualityThresholds):
    """Every check of ``QUALITY_CHECKS`` on each partition of the run."""
    checks = {
        **QUALITY_CHECKS,
        "clip_scores_mostly_above_threshold": partial(
            clip_scores_mostly_above_threshold, quality_thresholds=quality_thresholds
        ),
    }
    yield from per_partition("quality", checks, quality)
