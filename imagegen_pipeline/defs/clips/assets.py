"""Short Stable Video Diffusion clips of the chosen images of each prompt."""

from contextlib import nullcontext
from typing import Any

import dagster as dg
import pandas as pd

from imagegen_pipeline.defs.gpu import GPU_POOL, gpu_op_tags, model_for_step
from imagegen_pipeline.defs.metadata import add_partition_metadata, markdown_table, thumbnails
from imagegen_pipeline.defs.partitions import prompt_set_x_backend_partitions, single_run
from imagegen_pipeline.defs.step_records import (
    PartitionStep,
    each_partition,
    generation_step_record,
)
from imagegen_pipeline.project_config import load_project_config
from imagegen_pipeline.records import VIDEO_CLIP_STATUSES, VideoClipRecord
from imagegen_pipeline.registry import SVD
from imagegen_pipeline.steps.clips import (
    VideoStepContext,
    clips_folder,
    plan_video_clips,
    run_video_step,
    select_sources,
)
from imagegen_pipeline.video.video_clip import video_clip_settings

PREVIEW_COLUMNS = ["prompt_id", "image_index", "status", "seconds", "memory_fallback", "error"]
CLIP_COLUMNS = list(VideoClipRecord.__dataclass_fields__)


@dg.asset(
    partitions_def=prompt_set_x_backend_partitions,
    backfill_policy=single_run,
    group_name="clips",
    kinds={"pytorch", "huggingface", "video"},
    pool=GPU_POOL,
    op_tags=gpu_op_tags(),
    required_resource_keys={"storage", SVD.name},
)
def clips(
    context: dg.AssetExecutionContext, keepers: dict[str, pd.DataFrame]
) -> dict[str, pd.DataFrame]:
    """An MP4 video clip and an animated WebP preview of the chosen images; one row per clip.

    Reads ``keepers``: only kept candidates are animated (their rows carry the quality
    report's columns, so ``selection="top_n"`` can still rank a prompt's keepers by CLIP
    score, and blank images are never animated). The graph is therefore a chain, images ->
    quality -> keepers -> clips -> video_quality: nothing upstream reads clips (their scores
    are ``video_quality``), so there is no cycle. Clips are content-addressed, so a re-run
    makes only the missing ones; one failed clip fails alone.
    """
    storage_resource = context.resources.storage
    storage = storage_resource.storage()

    def step(warm: Any, key: str, prompt_set: str, backend: str) -> PartitionStep:
        settings = warm.settings
        clip_settings = video_clip_settings(settings, warm.model_id)
        chosen = keepers[key]
        kept = chosen[chosen["kept"].astype(bool)] if len(chosen) else chosen
        sources = select_sources(kept, settings.selection, settings.n)
        planned = plan_video_clips(sources, clip_settings)
        where = VideoStepContext(
            storage=storage,
            prompt_set=prompt_set,
            backend=backend,
            run_id=context.run.run_id,
            preview_side=settings.preview_side,
            writer_threads=storage_resource.writer_threads,
            verify=storage_resource.verify,
        )
        outcome = run_video_step(
            clip_settings, lambda: warm.model, planned, where, log=context.log.info
        )
        counts = outcome.counts
        record = generation_step_record(
            context,
            "clips",
            prompt_set,
            backend,
            clip_settings,
            warm.device,
            outcome,
            is_local=SVD.is_local,
        )
        table = pd.DataFrame([r.__dict__ for r in outcome.records], columns=CLIP_COLUMNS)
        fallbacks = int(table["memory_fallback"].notna().sum())
        if fallbacks:
            context.log.warning(f"{fallbacks} clip(s) needed an out-of-memory fallback.")
        if counts.get("failed"):
            context.log.warning(f"{prompt_set}/{backend}: {counts['failed']} clip(s) failed.")
        add_partition_metadata(
            context,
            {
                "rows": len(table),
                **{status: counts.get(status, 0) for status in VIDEO_CLIP_STATUSES},
                "damaged": len(outcome.damaged),
                "model_id": record.model_id,
                **({"device": record.device} if record.device else {}),
                "worker": record.worker,
                "seconds": round(outcome.seconds, 3),
                "model_loads": record.model_loads,
                "model_cache_hits": record.model_cache_hits,
                "model_load_seconds": round(record.model_load_seconds, 3),
                "memory_fallbacks": fallbacks,
                "preview": markdown_table(table, PREVIEW_COLUMNS),
                "first_frames": thumbnails(
                    list(table["preview_path"].dropna()), storage.read_bytes, limit=4
                ),
                "clips_dir": dg.MetadataValue.path(str(clips_folder(storage, prompt_set, backend))),
            },
            partition_key=key,
        )
        return PartitionStep(table, record, counts)

    with model_for_step(context, SVD, load_project_config()) as warm:
        done = each_partition(context, "clips of", step, lambda _: nullcontext(warm))
    return {key: result.table for key, result in done.items()}
