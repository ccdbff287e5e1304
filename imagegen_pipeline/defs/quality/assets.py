"""Quality reports: CLIP and aesthetic scores and pixel checks of every image and video clip."""

import time
from contextlib import nullcontext
from typing import Any

import dagster as dg
import pandas as pd

from imagegen_pipeline.defs.gpu import GPU_POOL, gpu_op_tags, model_for_step
from imagegen_pipeline.defs.metadata import add_partition_metadata, markdown_table, thumbnails
from imagegen_pipeline.defs.partitions import (
    PROMPT_SET_INPUT,
    prompt_set_x_backend_partitions,
    prompts_of,
    single_run,
)
from imagegen_pipeline.defs.scorers import SCORER_RESOURCE_KEYS, scorer_handles
from imagegen_pipeline.defs.step_records import (
    PartitionStep,
    each_partition,
    scoring_step_record,
)
from imagegen_pipeline.defs.storage import stored_table
from imagegen_pipeline.project_config import load_project_config
from imagegen_pipeline.registry import CLIP_MODEL
from imagegen_pipeline.run_metadata import load_run_metadata
from imagegen_pipeline.steps.best_of_n import default_scorer_name, policies_of, scorers_needed
from imagegen_pipeline.steps.candidate_scores import ScoreBook, add_scorer_columns
from imagegen_pipeline.steps.scores import (
    Scorer,
    score_image_table,
    score_video_clip_table,
    with_generation_facts,
)

PREVIEW_COLUMNS = [
    "prompt_id",
    "image_index",
    "clip_score",
    "clip_score_enhanced",
    "aesthetic",
    "is_blank",
    "generation_seconds",
    "generation_cost_usd",
]
VIDEO_PREVIEW_COLUMNS = [
    "prompt_id",
    "image_index",
    "status",
    "source_similarity",
    "temporal_consistency",
    "temporal_consistency_min",
]


def _mean(frame: pd.DataFrame, column: str) -> float | str:
    """The column's mean for the metadata, "n/a" when it has no values."""
    values = pd.to_numeric(frame[column], errors="coerce") if column in frame else pd.Series()
    return float(values.mean()) if values.notna().any() else "n/a"


def _scored(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["scored"].astype(bool)] if len(table) else table


def score_partitions(
    context: dg.AssetExecutionContext,
    asset: str,
    score: Any,
) -> dict[str, pd.DataFrame]:
    """Run ``score(scorer, key, prompt_set, backend)`` on each partition of the run with one
    CLIP model (created only if some partition has something to score); record a step row
    (loads, warm-cache hits) and each partition's metadata."""
    with model_for_step(context, CLIP_MODEL, load_project_config()) as warm:
        loads_seen = 0  # the model's load count when this step last looked

        def clip_model() -> Any:
            nonlocal loads_seen
            if not warm.created:  # a model from the warm cache may have been loaded before
                loads_seen = warm.model.model_loads
            return warm.model

        scorer = Scorer(warm.settings.scorer_label(warm.model_id), clip_model)

        def step(_: Any, key: str, prompt_set: str, backend: str) -> PartitionStep:
            nonlocal loads_seen
            started = time.perf_counter()
            table, metadata = score(scorer, key, prompt_set, backend)
            loads_now = warm.model.model_loads if warm.created else 0
            loaded, loads_seen = loads_now > loads_seen, loads_now
            record = scoring_step_record(
                context,
                asset,
                prompt_set,
                backend,
                table,
                model_id=scorer.label,
                device=warm.device,
                seconds=time.perf_counter() - started,
                load_seconds=warm.model.load_seconds if loaded else 0.0,
            )
            metadata |= {
                "rows": len(table),
                "scored": len(_scored(table)),
                "newly_scored": record.generated,
                "scorer_model": scorer.label,
                "model_loads": record.model_loads,
                "model_cache_hits": record.model_cache_hits,
                "model_load_seconds": round(record.model_load_seconds, 3),
                "worker": record.worker,
            }
            add_partition_metadata(context, metadata, partition_key=key)
            counts = {"scored": record.generated, "reused": record.skipped_existing}
            return PartitionStep(table, record, counts)

        done = each_partition(context, asset, step, lambda _: nullcontext())
    return {key: result.table for key, result in done.items()}


@dg.asset(
    partitions_def=prompt_set_x_backend_partitions,
    ins={"enhanced_prompts": PROMPT_SET_INPUT},
    backfill_policy=single_run,
    group_name="quality",
    kinds={"pytorch", "parquet"},
    pool=GPU_POOL,
    op_tags=gpu_op_tags(),
    required_resource_keys={"storage", "quality_thresholds", *SCORER_RESOURCE_KEYS},
)
def quality(
    context: dg.AssetExecutionContext,
    images: dict[str, pd.DataFrame],
    enhanced_prompts: dict[str, pd.DataFrame],
) -> dict[str, pd.DataFrame]:
    """Scores of every image of the partition: one row per image, sortable by score or cost.

    Each row is the image's run-metadata row (status, seed, model, seconds, cost) plus the time
    and cost of the run that generated it (``generation_*``, also for images a re-run skipped),
    CLIPScore against the original and the enhanced prompt with truncation flags, CLIP
    aesthetic and per-aspect probabilities, the LAION aesthetic when a head is configured, and
    brightness, contrast, saturation, sharpness and the blank flag; per best-of-N scorer the
    set's rows use, ``score_<scorer>`` with its ``_model`` and ``_revision``. Images that do
    not exist (failed, blocked, skipped for budget) keep their row with empty scores.
    """
    storage = context.resources.storage.storage()
    project = load_project_config()
    thresholds = context.resources.quality_thresholds.blank_thresholds()
    workers = getattr(context.resources, CLIP_MODEL.name).workers

    def score(scorer: Scorer, key: str, prompt_set: str, backend: str) -> tuple[pd.DataFrame, dict]:
        prompts = prompts_of(enhanced_prompts, prompt_set, context.log.warning)
        originals = dict(zip(prompts["prompt_id"], prompts["original_prompt"], strict=True))
        table = score_image_table(
            scorer,
            images[key],
            originals,
            storage=storage,
            thresholds=thresholds,
            workers=workers,
            previous=stored_table(storage, "quality", prompt_set, backend),
            log=context.log.info,
        )
        made = load_run_metadata(storage, "images", prompt_set=prompt_set, backend=backend)
        table = with_generation_facts(table, made)
        # The best-of-N scorers of the set's rows: one score column each, kept in the book.
        policies = policies_of(prompts, backend, default_scorer_name(project))
        with scorer_handles(context, scorers_needed(policies, False), project) as scorers:
            book = ScoreBook.read(storage, prompt_set, backend)
            table = add_scorer_columns(table, scorers, book, originals, context.log.info)
        scored = _scored(table)
        worst = scored.sort_values("clip_score") if len(scored) else scored
        return table, {
            "blank": int(scored["is_blank"].sum()) if len(scored) else 0,
            "truncated_prompts": int(scored["clip_truncated"].eq(True).sum()) if len(scored) else 0,
            "mean_clip_score": _mean(scored, "clip_score"),
            "mean_clip_score_enhanced": _mean(scored, "clip_score_enhanced"),
            "mean_aesthetic": _mean(scored, "aesthetic"),
            "mean_laion_aesthetic": _mean(scored, "laion_aesthetic"),
            **{f"mean_score_{name}": _mean(scored, f"score_{name}") for name in scorers},
            "scored_by_scorers": book.computed,
            "worst_images": markdown_table(worst, PREVIEW_COLUMNS),
            "worst_thumbnails": thumbnails(
                list(worst["path"]) if len(worst) else [], storage.read_bytes, limit=4
            ),
        }

    return score_partitions(context, "quality", score)


@dg.asset(
    partitions_def=prompt_set_x_backend_partitions,
    backfill_policy=single_run,
    group_name="quality",
    kinds={"pytorch", "parquet"},
    pool=GPU_POOL,
    op_tags=gpu_op_tags(),
    required_resource_keys={"storage", CLIP_MODEL.name},
)
def video_quality(
    context: dg.AssetExecutionContext, clips: dict[str, pd.DataFrame]
) -> dict[str, pd.DataFrame]:
    """Scores of every video clip of the partition: one row per clip (its metadata row too).

    ``source_similarity``: CLIP cosine of each frame to the source image (mean, min): does the
    clip still show the picture? ``temporal_consistency``: cosine of consecutive frames (mean,
    min): does it flicker or jump? A separate asset from ``quality`` because clips are made
    from the ``quality`` ranking, so scoring them there would be a cycle.
    """
    storage = context.resources.storage.storage()

    def score(scorer: Scorer, key: str, prompt_set: str, backend: str) -> tuple[pd.DataFrame, dict]:
        table = score_video_clip_table(
            scorer,
            clips[key],
            storage=storage,
            previous=stored_table(storage, "video_quality", prompt_set, backend),
            log=context.log.info,
        )
        scored = _scored(table)
        return table, {
            "mean_source_similarity": _mean(scored, "source_similarity"),
            "mean_temporal_consistency": _mean(scored, "temporal_consistency"),
            "preview": markdown_table(table, VIDEO_PREVIEW_COLUMNS),
        }

    return score_partitions(context, "video_quality", score)
