"""Images of one prompt set from one backend, with one run-metadata row per image."""

from pathlib import Path

import dagster as dg
import pandas as pd

from imagegen_pipeline.backends.base import ImageBackend
from imagegen_pipeline.defs.gpu import GPU_POOL, gpu_op_tags
from imagegen_pipeline.defs.images.resources import FluxSchnellResource, SdxlTurboResource
from imagegen_pipeline.defs.metadata import markdown_table, thumbnails
from imagegen_pipeline.defs.partitions import (
    from_prompt_set,
    partition_parts,
    prompt_set_x_backend_partitions,
)
from imagegen_pipeline.defs.storage import StorageResource
from imagegen_pipeline.image_generation import plan_images, run_images_step
from imagegen_pipeline.run_metadata import write_run_metadata

PREVIEW_COLUMNS = ["prompt_id", "image_index", "status", "seed", "seconds", "error"]


@dg.asset(
    partitions_def=prompt_set_x_backend_partitions,
    ins={"enhanced_prompts": dg.AssetIn(partition_mapping=from_prompt_set)},
    group_name="images",
    kinds={"pytorch", "huggingface", "parquet"},
    pool=GPU_POOL,
    op_tags=gpu_op_tags(),
)
def images(
    context: dg.AssetExecutionContext,
    enhanced_prompts: pd.DataFrame,
    storage: StorageResource,
    flux_schnell: FluxSchnellResource,
    sdxl_turbo: SdxlTurboResource,
) -> dg.Output[pd.DataFrame]:
    """Generate every image of the prompt set that the backend lacks; one row per image.

    Outputs are content-addressed PNGs, so a re-run generates only what is missing. One failed
    prompt fails alone; the step fails only when no image of the partition exists afterwards.
    """
    prompt_set, backend_name = partition_parts(context)
    backend: ImageBackend
    if backend_name == "flux_schnell":
        backend = flux_schnell.create_backend()
    elif backend_name == "sdxl_turbo":
        backend = sdxl_turbo.create_backend()
    else:
        raise dg.Failure(f"The {backend_name!r} backend is not implemented yet.")

    images_dir = storage.images_dir(prompt_set, backend_name)
    planned = plan_images(enhanced_prompts, backend, images_dir)
    run_id = context.run.run_id
    try:
        outcome = run_images_step(
            backend,
            planned,
            images_dir=images_dir,
            prompt_set=prompt_set,
            run_id=run_id,
            log=context.log.info,
        )
    finally:
        backend.unload()  # free the GPU for the next step in this process
    label = f"{prompt_set}_{backend_name}"
    images_file = write_run_metadata(
        storage.base, "images", outcome.image_rows, run_id=run_id, partition_label=label
    )
    steps_file = write_run_metadata(
        storage.base, "steps", [outcome.step_row], run_id=run_id, partition_label=label
    )
    table = pd.DataFrame(outcome.image_rows)
    counts = outcome.counts
    available = counts["ok"] + counts["skipped_existing"]
    if planned and not available:
        raise dg.Failure(
            f"No image of {prompt_set}/{backend_name} succeeded: {counts}. "
            f"First error: {next((r['error'] for r in outcome.image_rows if r['error']), 'n/a')}",
            metadata={"run_metadata": dg.MetadataValue.path(str(images_file))},
        )
    step = outcome.step_row
    paths = [p for p in table.get("path", pd.Series(dtype=str)).dropna()]
    return dg.Output(
        table,
        metadata={
            "rows": len(table),
            **{status: count for status, count in counts.items()},
            "model_id": step["model_id"],
            "device": step["device"],
            "seconds": round(step["seconds"], 3),
            "images_per_second": dg.MetadataValue.float(step["items_per_second"] or 0.0),
            "model_load_seconds": round(step["model_load_seconds"], 3),
            "preview": markdown_table(table, PREVIEW_COLUMNS),
            "thumbnails": thumbnails(paths),
            "images_dir": dg.MetadataValue.path(str(images_dir)),
            "run_metadata_images": dg.MetadataValue.path(str(images_file)),
            "run_metadata_steps": dg.MetadataValue.path(str(steps_file)),
            "cost_usd": float(step["cost_usd"] or 0.0),
        },
    )


def image_paths(table: pd.DataFrame) -> list[Path]:
    """Paths of the images of an ``images`` partition that exist (new or from earlier runs)."""
    usable = table[table["status"].isin(["ok", "skipped_existing"])]
    return [Path(path) for path in usable["path"]]
