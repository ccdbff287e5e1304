"""Quality reports: CLIP and aesthetic scores and pixel checks of every image and clip."""

import time

import dagster as dg
import pandas as pd

from imagegen_pipeline.defs.gpu import GPU_POOL, gpu_op_tags, model_step
from imagegen_pipeline.defs.metadata import markdown_table, thumbnails
from imagegen_pipeline.defs.partitions import (
    from_prompt_set,
    partition_parts,
    prompt_set_x_backend_partitions,
)
from imagegen_pipeline.defs.quality.resources import ClipScorerResource, QualityThresholds
from imagegen_pipeline.defs.storage import StorageResource
from imagegen_pipeline.run_metadata import load_run_metadata
from imagegen_pipeline.scoring.quality_step import (
    score_clip_table,
    score_image_table,
    with_generation_facts,
)
from imagegen_pipeline.video.clip_generation import EXISTING_STATUSES

PREVIEW_COLUMNS = [
    "prompt_id", "image_index", "clip_score", "clip_score_enhanced", "aesthetic",
    "is_blank", "generation_seconds", "generation_cost_usd",
]  # fmt: skip
CLIP_PREVIEW_COLUMNS = [
    "prompt_id", "image_index", "status", "source_similarity", "temporal_consistency",
    "temporal_consistency_min",
]  # fmt: skip


def _mean(frame: pd.DataFrame, column: str) -> float | str:
    """The column's mean for the metadata, "n/a" when it has no values."""
    values = pd.to_numeric(frame[column], errors="coerce") if column in frame else pd.Series()
    return float(values.mean()) if values.notna().any() else "n/a"


@dg.asset(
    partitions_def=prompt_set_x_backend_partitions,
    ins={"enhanced_prompts": dg.AssetIn(partition_mapping=from_prompt_set)},
    group_name="quality",
    kinds={"pytorch", "parquet"},
    pool=GPU_POOL,
    op_tags=gpu_op_tags(),
)
def quality(
    context: dg.AssetExecutionContext,
    images: pd.DataFrame,
    enhanced_prompts: pd.DataFrame,
    storage: StorageResource,
    clip_scorer: ClipScorerResource,
    quality_thresholds: QualityThresholds,
) -> dg.Output[pd.DataFrame]:
    """Scores of every image of the partition: one row per image, sortable by score or cost.

    Each row is the image's run-metadata row (status, seed, model, seconds, cost) plus the time
    and cost of the run that generated it (``generation_*``, also for images a re-run skipped),
    CLIPScore against the original and the enhanced prompt with truncation flags, CLIP
    aesthetic and per-aspect probabilities, the LAION aesthetic when a head is configured, and
    brightness, contrast, saturation, sharpness and the blank flag. Images that do not exist
    (failed, blocked, skipped for budget) keep their row with empty scores.
    """
    prompt_set, backend = partition_parts(context)
    started = time.perf_counter()
    originals = dict(
        zip(enhanced_prompts["prompt_id"], enhanced_prompts["original_prompt"], strict=True)
    )
    report_path = storage.table_path("quality", prompt_set, backend)
    previous = pd.read_parquet(report_path) if report_path.exists() else None
    scorer = clip_scorer.create_scorer()
    with model_step(scorer):
        table = score_image_table(
            scorer,
            images,
            originals,
            thresholds=quality_thresholds.blank_thresholds(),
            workers=clip_scorer.workers,
            previous=previous,
        )
        load_seconds = scorer.load_seconds
    table = with_generation_facts(table, load_run_metadata(storage.base, "images"))
    seconds = time.perf_counter() - started
    scored = table[table["scored"]] if len(table) else table
    if len(table) and scored.empty:
        raise dg.Failure(
            f"No image of {prompt_set}/{backend} could be scored.",
            metadata={"errors": markdown_table(table, ["prompt_id", "status", "score_error"])},
        )
    worst = scored.sort_values("clip_score") if len(scored) else scored
    blank = int(scored["is_blank"].sum()) if len(scored) else 0
    return dg.Output(
        table,
        metadata={
            "rows": len(table),
            "scored": len(scored),
            "blank": blank,
            "truncated_prompts": int(scored["clip_truncated"].eq(True).sum()) if len(scored) else 0,
            "mean_clip_score": _mean(scored, "clip_score"),
            "median_clip_score": float(scored["clip_score"].median()) if len(scored) else "n/a",
            "mean_clip_score_enhanced": _mean(scored, "clip_score_enhanced"),
            "mean_aesthetic": _mean(scored, "aesthetic"),
            "mean_laion_aesthetic": _mean(scored, "laion_aesthetic"),
            "scorer_model": scorer.model_label,
            "newly_scored": int(table["newly_scored"].sum()) if len(table) else 0,
            # Scoring throughput, model loading excluded.
            "images_per_second": dg.MetadataValue.float(
                int(table["newly_scored"].sum()) / max(seconds - load_seconds, 1e-9)
                if len(table)
                else 0.0
            ),
            "worst_images": markdown_table(worst, PREVIEW_COLUMNS),
            "worst_thumbnails": thumbnails(list(worst["path"]) if len(worst) else [], limit=4),
            "model_load_seconds": round(load_seconds, 3),
        },
    )


@dg.asset(
    partitions_def=prompt_set_x_backend_partitions,
    group_name="quality",
    kinds={"pytorch", "parquet"},
    pool=GPU_POOL,
    op_tags=gpu_op_tags(),
)
def clip_quality(
    context: dg.AssetExecutionContext,
    clips: pd.DataFrame,
    storage: StorageResource,
    clip_scorer: ClipScorerResource,
) -> dg.Output[pd.DataFrame]:
    """Scores of every clip of the partition: one row per clip (its run-metadata row too).

    ``source_similarity``: CLIP cosine of each frame to the source image (mean, min): does the
    clip still show the picture? ``temporal_consistency``: cosine of consecutive frames (mean,
    min): does it flicker or jump? A separate asset from ``quality`` because clips are made
    from the ``quality`` ranking, so scoring them there would be a cycle.
    """
    started = time.perf_counter()
    existing = clips[clips["status"].isin(EXISTING_STATUSES)] if len(clips) else clips
    if existing.empty:
        context.log.info("No clip to score.")
        return dg.Output(clips.assign(scored=False), metadata={"rows": len(clips), "scored": 0})
    prompt_set, backend = partition_parts(context)
    report_path = storage.table_path("clip_quality", prompt_set, backend)
    previous = pd.read_parquet(report_path) if report_path.exists() else None
    scorer = clip_scorer.create_scorer()
    with model_step(scorer):
        table = score_clip_table(scorer, clips, previous)
        load_seconds = scorer.load_seconds
    seconds = time.perf_counter() - started
    scored = table[table["scored"]]
    return dg.Output(
        table,
        metadata={
            "rows": len(table),
            "scored": len(scored),
            "newly_scored": int(table["newly_scored"].sum()),
            "clips_per_second": dg.MetadataValue.float(
                int(table["newly_scored"].sum()) / max(seconds - load_seconds, 1e-9)
            ),
            "mean_source_similarity": _mean(scored, "source_similarity"),
            "mean_temporal_consistency": _mean(scored, "temporal_consistency"),
            "min_temporal_consistency": float(scored["temporal_consistency_min"].min())
            if len(scored)
            else "n/a",
            "scorer_model": scorer.model_label,
            "preview": markdown_table(table, CLIP_PREVIEW_COLUMNS),
            "model_load_seconds": round(load_seconds, 3),
        },
    )
