"""The project's partitions: one prompt set per CSV file, crossed with the image backends.

Every asset runs under ``BackfillPolicy.single_run()``: a backfill over many prompt sets is one
run that loads each model once, and the asset code handles every partition key of its run
(``context.partition_keys``) as if each had run alone.
"""

import warnings
from collections.abc import Callable, Sequence

import dagster as dg
import pandas as pd

from imagegen_pipeline.enhancement import ENHANCED_COLUMNS
from imagegen_pipeline.registry import BACKEND_NAMES

# One key per CSV file in the prompts folder, added by the prompt-files sensor and the demo.
prompt_set_partitions = dg.DynamicPartitionsDefinition(name="prompt_sets")

backend_partitions = dg.StaticPartitionsDefinition(list(BACKEND_NAMES))

prompt_set_x_backend_partitions = dg.MultiPartitionsDefinition(
    {"prompt_set": prompt_set_partitions, "backend": backend_partitions}
)

single_run = dg.BackfillPolicy.single_run()
# Marked beta in Dagster 1.13, and the point of this project's backfills: said once, here.
warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)

# Per-backend assets read the per-prompt-set assets of their own prompt set. The mapping is
# marked beta but has been stable since Dagster 1.4.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)
    from_prompt_set = dg.MultiToSingleDimensionPartitionMapping(
        partition_dimension_name="prompt_set"
    )


# What a per-backend asset reads of its prompt set. A set whose CSV could not be used has no
# enhanced prompts: it is allowed to be missing, so that a single run over every set (a
# backfill of "all partitions") still makes the others; the missing set plans nothing.
PROMPT_SET_INPUT = dg.AssetIn(
    partition_mapping=from_prompt_set, metadata={"allow_missing_partitions": True}
)


def prompts_of(
    enhanced_prompts: dict[str, pd.DataFrame], prompt_set: str, log: Callable[[str], None]
) -> pd.DataFrame:
    """The enhanced prompts of ``prompt_set``, or none (with a warning) when it has none."""
    if prompt_set in enhanced_prompts:
        return enhanced_prompts[prompt_set]
    log(f"Prompt set {prompt_set!r} has no enhanced prompts (its CSV could not be used): skipped.")
    return pd.DataFrame(columns=list(ENHANCED_COLUMNS))


def partition_key(prompt_set: str, backend: str) -> dg.MultiPartitionKey:
    """The prompt set x backend partition key of ``prompt_set`` and ``backend``."""
    return dg.MultiPartitionKey({"prompt_set": prompt_set, "backend": backend})


def split_key(key: str) -> tuple[str, str]:
    """(prompt set, backend) of a prompt set x backend partition key."""
    parts = prompt_set_x_backend_partitions.get_partition_key_from_str(str(key))
    return parts.keys_by_dimension["prompt_set"], parts.keys_by_dimension["backend"]


def keys_by_backend(keys: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """A run's partition keys grouped by backend: backend -> [(key, prompt set), ...]."""
    grouped: dict[str, list[tuple[str, str]]] = {}
    for key in keys:
        prompt_set, backend = split_key(key)
        grouped.setdefault(backend, []).append((str(key), prompt_set))
    return grouped
