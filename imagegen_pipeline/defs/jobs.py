"""The project's jobs: prepare prompt sets, generate per prompt set and backend, compare."""

import dagster as dg

from imagegen_pipeline.defs.partitions import prompt_set_partitions, prompt_set_x_backend_partitions

prepare_prompts_job = dg.define_asset_job(
    "prepare_prompts",
    selection=dg.AssetSelection.groups("prompts"),
    partitions_def=prompt_set_partitions,
    description="Validate and enhance prompt sets.",
)

generate_images_job = dg.define_asset_job(
    "generate_images",
    selection=dg.AssetSelection.groups("images", "quality", "keepers", "clips"),
    partitions_def=prompt_set_x_backend_partitions,
    description="Images, quality reports, keepers and video clips of prompt sets, per backend.",
)

compare_backends_job = dg.define_asset_job(
    "compare_backends",
    selection=dg.AssetSelection.groups("comparison"),
    partitions_def=prompt_set_partitions,
    description="Compare the backends of prompt sets: table, chart and HTML gallery.",
)
