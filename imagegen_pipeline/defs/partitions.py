"""The project's partitions: one prompt set per CSV file, crossed with the image backends."""

import warnings

import dagster as dg

from imagegen_pipeline.prompt_csv import BACKEND_NAMES

LOCAL_BACKENDS = ("flux_schnell", "sdxl_turbo")

# One key per CSV file in the prompts folder, added by the prompt-files sensor and the demo.
prompt_set_partitions = dg.DynamicPartitionsDefinition(name="prompt_sets")

backend_partitions = dg.StaticPartitionsDefinition(list(BACKEND_NAMES))

prompt_set_x_backend_partitions = dg.MultiPartitionsDefinition(
    {"prompt_set": prompt_set_partitions, "backend": backend_partitions}
)

# Per-backend assets read the per-prompt-set assets of their own prompt set. The mapping is
# marked beta but has been stable since Dagster 1.4.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)
    from_prompt_set = dg.MultiToSingleDimensionPartitionMapping(
        partition_dimension_name="prompt_set"
    )


def partition_parts(context: dg.AssetExecutionContext) -> tuple[str, str]:
    """(prompt set, backend) of a prompt set x backend partition."""
    keys = context.partition_key.keys_by_dimension
    return keys["prompt_set"], keys["backend"]
