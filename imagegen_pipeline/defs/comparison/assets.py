"""Each prompt set's backends compared: a table, a bar chart and an HTML contact sheet."""

from pathlib import Path

import dagster as dg
import pandas as pd

from imagegen_pipeline.atomic_files import write_bytes_atomic, write_text_atomic
from imagegen_pipeline.defs.comparison.report import (
    backend_summary,
    bar_chart_png,
    data_uri,
    gallery_html,
)
from imagegen_pipeline.defs.metadata import markdown_table
from imagegen_pipeline.defs.partitions import from_prompt_set, prompt_set_partitions
from imagegen_pipeline.defs.storage import StorageResource
from imagegen_pipeline.prompt_csv import BACKEND_NAMES

SUMMARY_COLUMNS = [
    "backend", "images", "failed", "blocked", "mean_clip_score", "median_clip_score",
    "mean_aesthetic", "seconds_per_image", "cost_per_image_usd", "clips",
    "mean_temporal_consistency",
]  # fmt: skip


class ComparisonConfig(dg.Config):
    """How the gallery is laid out."""

    worst_first: bool = False  # order prompts (and images) by lowest CLIP score first
    thumbnail_side: int = 256  # longest side of each embedded thumbnail, in pixels


def _partition_tables(storage: StorageResource, asset: str, prompt_set: str) -> dict:
    """Each backend's stored table of ``asset`` for ``prompt_set``, for backends that have one."""
    tables = {}
    for backend in BACKEND_NAMES:
        path = storage.table_path(asset, prompt_set, backend)
        if path.exists():
            tables[backend] = pd.read_parquet(path)
    return tables


@dg.asset(
    partitions_def=prompt_set_partitions,
    deps=[
        dg.AssetDep("quality", partition_mapping=from_prompt_set),
        dg.AssetDep("clip_quality", partition_mapping=from_prompt_set),
    ],
    group_name="comparison",
    kinds={"html", "parquet"},
    # Refresh after any backend's reports of the set change, once none is still running;
    # unlike eager(), a backend that never ran (gemini without a key) does not block it.
    automation_condition=(
        dg.AutomationCondition.any_deps_updated().since_last_handled()
        & ~dg.AutomationCondition.any_deps_in_progress()
    ),
)
def backend_comparison(
    context: dg.AssetExecutionContext, config: ComparisonConfig, storage: StorageResource
) -> dg.Output[pd.DataFrame]:
    """One row per backend (images, failures, CLIP and aesthetic scores, seconds and cost per
    image, clips), a bar chart, and storage/reports/<prompt set>/gallery.html.

    Each prompt-set partition depends on every backend partition of its set. The backends that
    ran are read from their stored Parquet tables directly (a backend never run, e.g. Gemini
    without a key, is simply absent), which keeps the IO manager one-partition-per-file simple.
    """
    prompt_set = context.partition_key
    quality = _partition_tables(storage, "quality", prompt_set)
    if not quality:
        raise dg.Failure(f"No backend of {prompt_set!r} has a quality report yet.")
    clip_quality = _partition_tables(storage, "clip_quality", prompt_set)
    summary = backend_summary(quality, clip_quality)
    chart = bar_chart_png(summary, f"{prompt_set}: backends compared")
    page = gallery_html(
        prompt_set,
        summary,
        quality,
        clip_quality,
        chart,
        worst_first=config.worst_first,
        thumbnail_side=config.thumbnail_side,
    )
    reports_dir = storage.base / "reports" / prompt_set
    chart_path, gallery_path = reports_dir / "comparison.png", reports_dir / "gallery.html"
    write_bytes_atomic(chart_path, chart)
    write_text_atomic(gallery_path, page)
    context.log.info(f"Gallery: {gallery_path.resolve()}")
    return dg.Output(
        summary,
        metadata={
            "backends": len(summary),
            "summary": markdown_table(summary.round(4), SUMMARY_COLUMNS),
            "chart": dg.MetadataValue.md(f"![comparison]({data_uri(chart, 'image/png')})"),
            "gallery": dg.MetadataValue.path(str(gallery_path)),
            "gallery_url": dg.MetadataValue.url(Path(gallery_path).resolve().as_uri()),
            "chart_png": dg.MetadataValue.path(str(chart_path)),
        },
    )
