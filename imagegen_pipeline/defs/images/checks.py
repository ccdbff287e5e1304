"""Checks of each ``images`` partition."""

import dagster as dg
import pandas as pd

from imagegen_pipeline.defs.checks import partitioned_check_specs, per_partition
from imagegen_pipeline.defs.metadata import markdown_table
from imagegen_pipeline.records import EXISTING_STATUSES

PROBLEM_STATUSES = ("failed", "blocked", "skipped_budget")


def every_image_generated(images: pd.DataFrame) -> dg.AssetCheckResult:
    """WARN when some images failed, were blocked or skipped for budget; ERROR when none exist."""
    problems = images[images["status"].isin(PROBLEM_STATUSES)] if len(images) else images
    available = int(images["status"].isin(EXISTING_STATUSES).sum()) if len(images) else 0
    counts = images["status"].value_counts().to_dict() if len(images) else {}
    nothing = len(images) > 0 and available == 0
    return dg.AssetCheckResult(
        passed=problems.empty,
        severity=dg.AssetCheckSeverity.ERROR if nothing else dg.AssetCheckSeverity.WARN,
        metadata={
            "planned": len(images),
            "available": available,
            **{f"{status}": int(counts.get(status, 0)) for status in PROBLEM_STATUSES},
            "first_errors": markdown_table(
                problems, ["prompt_id", "image_index", "status", "error"], rows=5
            ),
        },
    )


def no_damaged_files(images: pd.DataFrame) -> dg.AssetCheckResult:
    """WARN when this run found image files it could not trust (size, decoding or sha256
    against their rows), moved them to the quarantine and made them again."""
    damaged = images[images["damage"].notna()] if "damage" in images and len(images) else images
    return dg.AssetCheckResult(
        passed=damaged.empty,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "damaged": len(damaged),
            "remade": int((damaged["status"] == "ok").sum()) if len(damaged) else 0,
            "files": markdown_table(damaged, ["prompt_id", "image_index", "status", "damage"]),
        },
    )


IMAGE_CHECKS = {
    "every_image_generated": every_image_generated,
    "no_damaged_files": no_damaged_files,
}


@dg.multi_asset_check(specs=partitioned_check_specs("images", IMAGE_CHECKS), can_subset=True)
def images_checks(images: dict[str, pd.DataFrame]):
    """Every check of ``IMAGE_CHECKS`` on each partition of the run."""
    yield from per_partition("images", IMAGE_CHECKS, images)
