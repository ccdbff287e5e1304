"""Each prompt set's backends compared: a table, a bar chart and an HTML contact sheet."""

from typing import Any

import dagster as dg
import pandas as pd

from imagegen_pipeline.defs.metadata import add_partition_metadata, markdown_table
from imagegen_pipeline.defs.partitions import (
    from_prompt_set,
    prompt_set_partitions,
    single_run,
    split_key,
)
from imagegen_pipeline.defs.storage import StorageResource
from imagegen_pipeline.registry import BACKEND_NAMES
from imagegen_pipeline.reviews import read_verdicts
from imagegen_pipeline.steps.comparison import (
    backend_summary,
    bar_chart_png,
    data_uri,
    gallery_html,
    report_digest,
    steering_summary,
)
from imagegen_pipeline.steps.hybrid import HYBRID_COLUMNS, load_routing, with_hybrid_split
from imagegen_pipeline.storage import Storage

SUMMARY_COLUMNS = [
    "backend",
    "images",
    "keepers",
    "failed",
    "blocked",
    "mean_clip_score",
    "median_clip_score",
    "mean_aesthetic",
    "seconds_per_image",
    "cost_per_image_usd",
    "clips",
    "mean_temporal_consistency",
]
# Refresh after any backend's reports of the set change, once none is still running; unlike
# eager(), a backend that never ran (gemini without a key) does not block it. The trigger is an
# edge (an update seen on a tick), so a set whose reports were made while no tick saw them (the
# daemon stopped, or before the sensor's first tick) would never be drawn: a set with reports and
# no comparison is drawn as well, unless its last comparison run failed.
REPORTS_CHANGED = dg.AutomationCondition.any_deps_updated().since_last_handled()
NEVER_COMPARED = (
    dg.AutomationCondition.missing()
    & dg.AutomationCondition.any_deps_match(~dg.AutomationCondition.missing())
    & ~dg.AutomationCondition.in_progress()
    & ~dg.AutomationCondition.execution_failed()
).with_label("reports but no comparison")
REFRESH_COMPARISON = (
    REPORTS_CHANGED | NEVER_COMPARED
) & ~dg.AutomationCondition.any_deps_in_progress()

# Every backend partition of the set is read; a backend that never ran (Gemini without a key)
# has no table and is simply absent from the comparison.
PER_BACKEND_INPUT = dg.AssetIn(
    partition_mapping=from_prompt_set, metadata={"allow_missing_partitions": True}
)


class ComparisonConfig(dg.Config):
    """How the gallery is laid out."""

    worst_first: bool = False  # order prompts (and images) by lowest CLIP score first
    thumbnail_side: int = 256  # longest side of each embedded thumbnail, in pixels


def with_latest_verdicts(
    table: pd.DataFrame, store: Storage, prompt_set: str, backend: str
) -> pd.DataFrame:
    """A quality table with each image's latest review verdict, which orders the gallery."""
    verdicts = read_verdicts(store, prompt_set, backend)[["image_id", "verdict"]]
    return table.merge(verdicts, how="left", on="image_id") if len(table) else table


def _drawn_from(store: Storage, path: Any) -> str | None:
    """The digest the set's files were drawn from, if they were drawn (see report_digest)."""
    try:
        return store.read_bytes(path).decode()
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def by_set(tables: dict[str, pd.DataFrame]) -> dict[str, dict[str, pd.DataFrame]]:
    """Per-backend tables regrouped by prompt set: {prompt set: {backend: table}}.

    Backends come in the registry's order, whatever order Dagster loaded the partitions in, so
    the table, chart and gallery columns stay put from one report to the next."""
    split = [(*split_key(key), table) for key, table in tables.items()]
    split.sort(key=lambda row: BACKEND_NAMES.index(row[1]))
    grouped: dict[str, dict[str, pd.DataFrame]] = {}
    for prompt_set, backend, table in split:
        grouped.setdefault(prompt_set, {})[backend] = table
    return grouped


@dg.asset(
    partitions_def=prompt_set_partitions,
    ins={"keepers": PER_BACKEND_INPUT, "video_quality": PER_BACKEND_INPUT},
    backfill_policy=single_run,
    group_name="comparison",
    kinds={"html", "parquet"},
    automation_condition=REFRESH_COMPARISON,
)
def backend_comparison(
    context: dg.AssetExecutionContext,
    config: ComparisonConfig,
    storage: StorageResource,
    keepers: dict[str, pd.DataFrame],
    video_quality: dict[str, pd.DataFrame],
) -> dict[str, pd.DataFrame]:
    """One row per backend (images, keepers, failures, CLIP and aesthetic scores, seconds and
    cost per image, video clips), a bar chart, and storage/reports/<prompt set>/gallery.html
    (per prompt each backend's keepers first, its other candidates behind them).

    Reads ``keepers``: each row is a quality-report row plus its keeper columns."""
    store = storage.storage()
    quality_by_set, video_by_set = by_set(keepers), by_set(video_quality)
    summaries = {}
    for prompt_set in context.partition_keys:
        reports = quality_by_set.get(prompt_set, {})
        if not reports:
            raise dg.Failure(f"No backend of {prompt_set!r} has a quality report yet.")
        reports = {
            backend: with_latest_verdicts(table, store, prompt_set, backend)
            for backend, table in reports.items()
        }
        videos = video_by_set.get(prompt_set, {})
        summary = backend_summary(reports, videos)
        # Rows with backends "any": how many of their images, and what cost, each backend took.
        summary = with_hybrid_split(summary, reports, load_routing(store, prompt_set))
        steering = steering_summary(reports)
        chart_path = store.path("reports", prompt_set, "comparison.png")
        gallery_path = store.path("reports", prompt_set, "gallery.html")
        # Drawing is most of a no-op run's time over many sets: kept when nothing changed.
        digest_path = store.path("reports", prompt_set, "drawn_from.sha256")
        frames = {"summary": summary, "steering": steering}
        frames |= {f"keepers:{backend}": table for backend, table in reports.items()}
        frames |= {f"clips:{backend}": table for backend, table in videos.items()}
        digest = report_digest(prompt_set, frames, config.model_dump())
        if _drawn_from(store, digest_path) == digest and store.exists(gallery_path):
            chart = store.read_bytes(chart_path)
        else:
            chart = bar_chart_png(summary, f"{prompt_set}: backends compared")
            page = gallery_html(
                prompt_set,
                summary,
                reports,
                videos,
                chart,
                read_bytes=store.read_bytes,
                steering=steering,
                worst_first=config.worst_first,
                thumbnail_side=config.thumbnail_side,
            )
            store.write_bytes(chart_path, chart)
            store.write_bytes(gallery_path, page.encode("utf-8"))
            store.write_bytes(digest_path, digest.encode())  # last: a kill before it redraws
            context.log.info(f"Gallery of {prompt_set}: {gallery_path}")
        add_partition_metadata(
            context,
            {
                "backends": len(summary),
                "summary": markdown_table(
                    summary.round(4),
                    SUMMARY_COLUMNS + [c for c in HYBRID_COLUMNS if c in summary],
                ),
                **(
                    {"by_lora_and_control": markdown_table(steering.round(4), list(steering))}
                    if len(steering)
                    else {}
                ),
                "chart": dg.MetadataValue.md(f"![comparison]({data_uri(chart, 'image/png')})"),
                "gallery": dg.MetadataValue.path(str(gallery_path)),
                "chart_png": dg.MetadataValue.path(str(chart_path)),
            },
            partition_key=prompt_set,
        )
        summaries[prompt_set] = summary
    return summaries
