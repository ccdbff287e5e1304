"""Short Stable Video Diffusion clips of the chosen images of each prompt."""

import dagster as dg
import pandas as pd

from imagegen_pipeline.defs.clips.resources import SvdResource
from imagegen_pipeline.defs.gpu import GPU_POOL, gpu_op_tags, model_step
from imagegen_pipeline.defs.metadata import markdown_table, thumbnails
from imagegen_pipeline.defs.partitions import partition_parts, prompt_set_x_backend_partitions
from imagegen_pipeline.defs.storage import StorageResource
from imagegen_pipeline.run_metadata import CLIPS_SCHEMA, write_step_metadata
from imagegen_pipeline.video.clip_generation import plan_clips, run_clips_step, select_sources

PREVIEW_COLUMNS = ["prompt_id", "image_index", "status", "seconds", "memory_fallback", "error"]


@dg.asset(
    partitions_def=prompt_set_x_backend_partitions,
    group_name="clips",
    kinds={"pytorch", "huggingface", "video"},
    pool=GPU_POOL,
    op_tags=gpu_op_tags(),
)
def clips(
    context: dg.AssetExecutionContext,
    quality: pd.DataFrame,
    storage: StorageResource,
    svd: SvdResource,
) -> dg.Output[pd.DataFrame]:
    """An MP4 clip and an animated WebP preview of the chosen images; one row per clip.

    Reads ``quality`` rather than ``images``: the quality table holds every image row plus its
    scores, so ``svd.selection="top_n"`` can rank each prompt's images by CLIP score, and blank
    images are never animated. The graph is therefore a chain, images -> quality -> clips ->
    clip_quality: ``quality`` never reads clips (their scores are the ``clip_quality`` asset),
    so there is no cycle and no "use the scores if they happen to exist" fallback.

    Clips are content-addressed, so a re-run makes only the missing ones. One failed clip fails
    alone; the step fails only when clips were planned and none exists afterwards.
    """
    prompt_set, backend = partition_parts(context)
    sources = select_sources(quality, svd.selection, svd.n)
    context.log.info(f"{len(sources)} image(s) chosen ({svd.selection}, n={svd.n}).")
    clips_dir = storage.base / "clips" / prompt_set / backend
    generator = svd.create_generator()
    planned = plan_clips(sources, generator, clips_dir)
    run_id = context.run.run_id
    with model_step(generator):
        outcome = run_clips_step(
            generator,
            planned,
            clips_dir=clips_dir,
            prompt_set=prompt_set,
            backend=backend,
            run_id=run_id,
            preview_side=svd.preview_side,
            log=context.log.info,
        )
    clips_file, steps_file = write_step_metadata(
        storage.base, "clips", outcome.clip_rows, outcome.step_row,
        run_id=run_id, prompt_set=prompt_set, backend=backend,
    )  # fmt: skip
    table = pd.DataFrame(outcome.clip_rows, columns=CLIPS_SCHEMA.names)
    counts = outcome.counts
    if planned and not counts["ok"] + counts["skipped_existing"]:
        raise dg.Failure(
            f"No clip of {prompt_set}/{backend} succeeded: {counts}. "
            f"First error: {next((r['error'] for r in outcome.clip_rows if r['error']), 'n/a')}",
            metadata={"run_metadata": dg.MetadataValue.path(str(clips_file))},
        )
    step = outcome.step_row
    fallbacks = int(table["memory_fallback"].notna().sum())
    if fallbacks:
        context.log.warning(f"{fallbacks} clip(s) needed an out-of-memory fallback.")
    previews = list(table["preview_path"].dropna())
    return dg.Output(
        table,
        metadata={
            "rows": len(table),
            **counts,
            "model_id": step["model_id"],
            "device": step["device"],
            "seconds": round(step["seconds"], 3),
            "clips_per_minute": dg.MetadataValue.float(60 * (step["items_per_second"] or 0.0)),
            "model_load_seconds": round(step["model_load_seconds"], 3),
            "memory_fallbacks": fallbacks,
            "preview": markdown_table(table, PREVIEW_COLUMNS),
            "first_frames": thumbnails(previews, limit=4),
            "clips_dir": dg.MetadataValue.path(str(clips_dir)),
            "run_metadata_steps": dg.MetadataValue.path(str(steps_file)),
            **(
                {"run_metadata_clips": dg.MetadataValue.path(str(clips_file))} if clips_file else {}
            ),
        },
    )
