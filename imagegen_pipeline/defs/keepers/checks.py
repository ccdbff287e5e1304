"""Checks of each keepers table.

- ``prompts_below_gate`` (WARN): the share of prompts whose keeper is under its ``min_score``
  (no candidate passed the gate within N); passes when there is none.
- ``every_prompt_has_a_keeper`` (ERROR): each prompt of the partition kept an image.
"""

import dagster as dg
import pandas as pd

from imagegen_pipeline.defs.checks import (
    every_prompt_has,
    partitioned_check_specs,
    per_partition,
)
from imagegen_pipeline.defs.metadata import markdown_table

LIST_COLUMNS = ["prompt_id", "candidate_index", "scorer", "score", "min_score", "reason"]


def _kept(keepers: pd.DataFrame) -> pd.DataFrame:
    return keepers[keepers["kept"].astype(bool)] if len(keepers) else keepers


def prompts_below_gate(keepers: pd.DataFrame) -> dg.AssetCheckResult:
    """WARN when some prompt's keeper is under its min_score: no candidate passed the gate."""
    prompts = keepers["prompt_id"].nunique() if len(keepers) else 0
    kept = _kept(keepers)
    below = kept[kept["below_gate"].astype(bool)] if len(kept) else kept
    count = below["prompt_id"].nunique() if len(below) else 0
    return dg.AssetCheckResult(
        passed=count == 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "prompts": int(prompts),
            "prompts_below_gate": int(count),
            "share_below_gate": count / prompts if prompts else 0.0,
            "below_gate": markdown_table(below, LIST_COLUMNS),
        },
    )


def every_prompt_has_a_keeper(keepers: pd.DataFrame) -> dg.AssetCheckResult:
    """ERROR when a prompt of the partition kept no image (none was made, or all blank)."""
    columns = ["prompt_id", "candidate_index", "status", "reason"]
    return every_prompt_has(keepers, _kept(keepers), "keeper", columns)


KEEPERS_CHECKS = {
    "prompts_below_gate": prompts_below_gate,
    "every_prompt_has_a_keeper": every_prompt_has_a_keeper,
}


@dg.multi_asset_check(specs=partitioned_check_specs("keepers", KEEPERS_CHECKS), can_subset=True)
def keepers_checks(keepers: dict[str, pd.DataFrame]):
    """Every check of ``KEEPERS_CHECKS`` on each partition of the run."""
    yield from per_partition("keepers", KEEPERS_CHECKS, keepers)
