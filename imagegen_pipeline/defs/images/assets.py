"""Images of one prompt set from one backend, with one run-metadata row per image."""

from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from imagegen_pipeline.backends.base import ImageBackend
from imagegen_pipeline.backends.gemini import GeminiBackend, GeminiKeyMissingError
from imagegen_pipeline.defs.gpu import GPU_POOL, gpu_op_tags, model_step
from imagegen_pipeline.defs.images.resources import (
    FluxSchnellResource,
    GeminiResource,
    SdxlTurboResource,
)
from imagegen_pipeline.defs.metadata import markdown_table, thumbnails
from imagegen_pipeline.defs.partitions import (
    from_prompt_set,
    partition_parts,
    prompt_set_x_backend_partitions,
)
from imagegen_pipeline.defs.storage import StorageResource
from imagegen_pipeline.image_generation import plan_images, run_images_step
from imagegen_pipeline.run_metadata import write_step_metadata

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
    gemini: GeminiResource,
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
    elif backend_name == "gemini":
        try:
            backend = gemini.create_backend()
        except GeminiKeyMissingError as error:
            raise dg.Failure(description=str(error)) from None
    else:
        raise dg.Failure(f"Unknown backend {backend_name!r}.")

    images_dir = storage.images_dir(prompt_set, backend_name)
    planned = plan_images(enhanced_prompts, backend, images_dir)
    run_id = context.run.run_id
    with model_step(backend):
        outcome = run_images_step(
            backend,
            planned,
            images_dir=images_dir,
            prompt_set=prompt_set,
            run_id=run_id,
            log=context.log.info,
        )
    images_file, steps_file = write_step_metadata(
        storage.base, "images", outcome.image_rows, outcome.step_row,
        run_id=run_id, prompt_set=prompt_set, backend=backend_name,
    )  # fmt: skip
    table = pd.DataFrame(outcome.image_rows)
    counts = outcome.counts
    gemini_metadata = (
        gemini_totals(table, backend, context.log) if isinstance(backend, GeminiBackend) else {}
    )
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
            **gemini_metadata,
        },
    )


def gemini_totals(table: pd.DataFrame, backend: GeminiBackend, log: Any) -> dict[str, Any]:
    """Tokens, retries and calls of a Gemini partition; logs a reached budget or daily quota."""

    def total(column: str) -> int:
        values = table[column] if column in table else pd.Series(dtype=float)
        return int(pd.to_numeric(values, errors="coerce").fillna(0).sum())

    stats = backend.last_run
    budget = backend.config.budget_usd
    skipped = int((table["status"] == "skipped_budget").sum()) if len(table) else 0
    if stats.budget_reached:
        log.warning(
            f"Gemini budget of ${budget:.2f} reached (${stats.spent_usd:.4f} spent): "
            f"{skipped} image(s) were not requested (status skipped_budget). Raise budget_usd "
            "on the gemini resource and re-run to make them; finished images are kept."
        )
    if stats.daily_quota_exhausted:
        log.error(
            "The Gemini daily quota is exhausted: requests after it were not sent. Re-run after "
            "the quota resets (midnight Pacific time) or use a key with a higher quota."
        )
    return {
        "prompt_tokens": total("prompt_tokens"),
        "output_tokens": total("output_tokens"),
        "retries": total("retries"),
        "http_calls": stats.http_calls,
        **({"budget_usd": float(budget)} if budget is not None else {}),
        "budget_reached": stats.budget_reached,
        "daily_quota_exhausted": stats.daily_quota_exhausted,
    }


def image_paths(table: pd.DataFrame) -> list[Path]:
    """Paths of the images of an ``images`` partition that exist (new or from earlier runs)."""
    usable = table[table["status"].isin(["ok", "skipped_existing"])]
    return [Path(path) for path in usable["path"]]
