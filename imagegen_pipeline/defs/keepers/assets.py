"""The keepers of each prompt set x backend: per prompt the chosen candidate(s) and why."""

import dagster as dg
import pandas as pd

from imagegen_pipeline.defs.metadata import add_partition_metadata, markdown_table, thumbnails
from imagegen_pipeline.defs.partitions import (
    PROMPT_SET_INPUT,
    prompt_set_x_backend_partitions,
    prompts_of,
    single_run,
    split_key,
)
from imagegen_pipeline.defs.storage import StorageResource
from imagegen_pipeline.project_config import load_project_config
from imagegen_pipeline.reviews import read_verdicts
from imagegen_pipeline.steps.best_of_n import default_scorer_name, policies_of
from imagegen_pipeline.steps.keepers import candidate_table, choose_keepers

PREVIEW_COLUMNS = [
    "prompt_id",
    "candidate_index",
    "scorer",
    "score",
    "rank",
    "below_gate",
    "reason",
]


@dg.asset(
    partitions_def=prompt_set_x_backend_partitions,
    ins={"enhanced_prompts": PROMPT_SET_INPUT},
    backfill_policy=single_run,
    group_name="keepers",
    kinds={"parquet"},
)
def keepers(
    context: dg.AssetExecutionContext,
    storage: StorageResource,
    quality: dict[str, pd.DataFrame],
    enhanced_prompts: dict[str, pd.DataFrame],
) -> dict[str, pd.DataFrame]:
    """One row per candidate image: its prompt, candidate index, scorer (model id and
    revision), score, rank, whether it is kept, whether it was kept below the gate, and why.

    Each prompt keeps its ``select`` best candidates by its ``scorer`` (CSV columns or set
    defaults), after the reviewer's verdicts (a kept image is kept, a rejected one never is);
    with ``min_score``, a keeper under it is flagged ``below_gate``. Clips are made
    from the kept rows, and the comparison shows them first. No model runs here: the scores
    are the quality report's.
    """
    store = storage.storage()
    default_scorer = default_scorer_name(load_project_config())
    tables = {}
    for key in context.partition_keys:
        prompt_set, backend = split_key(key)
        prompts = prompts_of(enhanced_prompts, prompt_set, context.log.warning)
        policies = policies_of(prompts, backend, default_scorer)
        # A reviewer's keep or reject overrides the scorer's choice.
        verdicts = read_verdicts(store, prompt_set, backend)
        table = choose_keepers(candidate_table(quality[key], policies), verdicts)
        kept = table[table["kept"].astype(bool)] if len(table) else table
        prompts_kept = kept["prompt_id"].nunique() if len(kept) else 0
        below = kept[kept["below_gate"].astype(bool)]["prompt_id"].nunique() if len(kept) else 0
        add_partition_metadata(
            context,
            {
                "candidates": len(table),
                "prompts": len(policies),
                "keepers": len(kept),
                "prompts_with_keeper": int(prompts_kept),
                "prompts_below_gate": int(below),
                "keepers_per_prompt": len(kept) / len(policies) if policies else 0.0,
                "keepers_table": markdown_table(kept, PREVIEW_COLUMNS),
                "keeper_thumbnails": thumbnails(
                    list(kept["path"].dropna()) if len(kept) else [], store.read_bytes, limit=4
                ),
            },
            partition_key=key,
        )
        tables[key] = table
    return tables
