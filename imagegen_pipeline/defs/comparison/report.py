"""The backend comparison of one prompt set: a summary table, a bar chart and an HTML gallery.

Plain functions over the per-backend ``quality`` and ``clip_quality`` tables, no Dagster. The
gallery is one self-contained HTML file: thumbnails, clip previews and the chart are embedded
as data URIs, so it can be mailed, archived or opened from any folder.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from imagegen_pipeline.video.clip_generation import EXISTING_STATUSES

CHART_METRICS = [
    ("mean_clip_score", "Mean CLIP score (0-100)"),
    ("mean_aesthetic", "Mean CLIP aesthetic (0-1)"),
    ("seconds_per_image", "Seconds per image"),
    ("cost_per_image_usd", "Cost per image (USD)"),
]


def _numbers(frame: pd.DataFrame, column: str) -> pd.Series:
    if column not in frame:
        return pd.Series(dtype=float)
    return pd.to_numeric(frame[column], errors="coerce")


def _scored(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty or "scored" not in frame:
        return frame.head(0)
    return frame[frame["scored"].astype(bool)]


def backend_summary(
    quality: Mapping[str, pd.DataFrame], clip_quality: Mapping[str, pd.DataFrame]
) -> pd.DataFrame:
    """One row per backend: counts, CLIP and aesthetic scores, time and cost per image, clips."""
    rows = []
    for backend, table in quality.items():
        status = table["status"] if "status" in table else pd.Series(dtype=str)
        scored = _scored(table)
        clips = clip_quality.get(backend, pd.DataFrame())
        scored_clips = _scored(clips)
        rows.append(
            {
                "backend": backend,
                "images": int(status.isin(EXISTING_STATUSES).sum()),
                "failed": int((status == "failed").sum()),
                "blocked": int((status == "blocked").sum()),
                "skipped_budget": int((status == "skipped_budget").sum()),
                "scored": len(scored),
                "blank": int(scored["is_blank"].astype(bool).sum()) if len(scored) else 0,
                "mean_clip_score": _numbers(scored, "clip_score").mean(),
                "median_clip_score": _numbers(scored, "clip_score").median(),
                "mean_clip_score_enhanced": _numbers(scored, "clip_score_enhanced").mean(),
                "mean_aesthetic": _numbers(scored, "aesthetic").mean(),
                "mean_laion_aesthetic": _numbers(scored, "laion_aesthetic").mean(),
                "seconds_per_image": _numbers(scored, "generation_seconds").mean(),
                # Local backends record no cost: they cost nothing per image.
                "cost_per_image_usd": _numbers(scored, "generation_cost_usd").fillna(0.0).mean(),
                "clips": len(scored_clips),
                "mean_source_similarity": _numbers(scored_clips, "source_similarity").mean(),
                "mean_temporal_consistency": _numbers(scored_clips, "temporal_consistency").mean(),
            }
        )
    return pd.DataFrame(rows)


def bar_chart_png(summary: pd.DataFrame, title: str) -> bytes:
    """A 2x2 bar chart of CLIP score, aesthetic, seconds and cost per image, by backend."""
    # A bare Figure with the Agg canvas: no pyplot global state, safe in any thread or process.
    figure = Figure(figsize=(9, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2)
    colours = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]
    backends = list(summary["backend"]) if len(summary) else []
    for axis, (column, label) in zip(axes.flat, CHART_METRICS, strict=True):
        values = [0.0 if pd.isna(v) else float(v) for v in summary.get(column, [])]
        bars = axis.bar(backends, values, color=colours[: len(backends)] or None)
        axis.bar_label(bars, fmt="%.3g", fontsize=8)
        axis.set_title(label, fontsize=10)
        axis.tick_params(axis="x", labelsize=8)
        axis.margins(y=0.15)
    figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    """``data`` as a data URI."""
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def jpeg_thumbnail_uri(path: str | Path, side: int) -> str:
    """A JPEG thumbnail of an image file, as a data URI."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    return data_uri(buffer.getvalue(), "image/jpeg")


def _cost(value: object) -> float:
    """A cost in USD; local backends record none, which means free."""
    return 0.0 if value is None or pd.isna(value) else float(value)


def _format(value: object, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return pattern.format(value)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; background: #fafafa; color: #222; }
h1 { margin-bottom: 4px; } .meta { color: #666; margin-top: 0; }
table.summary { border-collapse: collapse; margin: 16px 0; font-size: 13px; }
table.summary th, table.summary td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
table.summary th:first-child, table.summary td:first-child { text-align: left; }
img.chart { max-width: 640px; width: 100%; border: 1px solid #ddd; background: white; }
.table-wrap { overflow-x: auto; }
section.prompt { background: white; border: 1px solid #ddd; border-radius: 6px;
  padding: 12px 16px; margin: 16px 0; }
section.prompt h2 { margin: 0 0 4px; font-size: 18px; }
.original { margin: 0 0 8px; } details { color: #555; font-size: 13px; margin-bottom: 8px; }
.backends { display: flex; gap: 16px; align-items: flex-start; overflow-x: auto; }
.backend { flex: 1 1 0; min-width: 220px; } .backend h3 { margin: 4px 0; font-size: 15px; }
.items { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; width: THUMBpx; } figure img { width: THUMBpx; height: auto; display: block;
  border-radius: 4px; } figcaption { font-size: 12px; color: #444; margin-top: 2px; }
.missing { width: THUMBpx; height: 96px; display: flex; align-items: center;
  justify-content: center; background: #f3e5e5; color: #922; border-radius: 4px;
  font-size: 12px; text-align: center; }
.flag { color: #b00; font-weight: bold; } .clip figcaption { color: #225; }
"""


def _image_figure(row: Mapping, side: int) -> str:
    if not row.get("scored") or not row.get("path"):
        reason = html.escape(str(row.get("status") or "missing"))
        detail = html.escape(str(row.get("error") or row.get("score_error") or ""))[:160]
        return f'<div class="missing" title="{detail}">{reason}<br>{detail}</div>'
    caption = (
        f"#{int(row['image_index'])} · CLIP {_format(row.get('clip_score'), '{:.1f}')}"
        f" · aesthetic {_format(row.get('aesthetic'), '{:.2f}')}"
        f"<br>{_format(row.get('generation_seconds'), '{:.2f}')} s"
        f" · ${_cost(row.get('generation_cost_usd')):.4f}"
    )
    if row.get("laion_aesthetic") is not None and not pd.isna(row.get("laion_aesthetic")):
        caption += f" · LAION {row['laion_aesthetic']:.2f}"
    if row.get("is_blank"):
        caption += ' · <span class="flag">BLANK</span>'
    if row.get("clip_truncated"):
        caption += ' · <span class="flag">prompt truncated</span>'
    title = html.escape(f"seed {row.get('seed')} · {row.get('path')}")
    return (
        f'<figure><img alt="{html.escape(str(row["prompt_id"]))}" title="{title}" '
        f'src="{jpeg_thumbnail_uri(row["path"], side)}"><figcaption>{caption}</figcaption></figure>'
    )


def _clip_figure(row: Mapping) -> str:
    preview = row.get("preview_path")
    if not preview or not Path(preview).exists():
        return ""
    caption = (
        f"clip of #{int(row['image_index'])} · temporal "
        f"{_format(row.get('temporal_consistency'), '{:.3f}')} · source "
        f"{_format(row.get('source_similarity'), '{:.3f}')}"
    )
    source = data_uri(Path(preview).read_bytes(), "image/webp")
    return (
        f'<figure class="clip"><img alt="clip" src="{source}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def gallery_html(
    prompt_set: str,
    summary: pd.DataFrame,
    quality: Mapping[str, pd.DataFrame],
    clip_quality: Mapping[str, pd.DataFrame],
    chart_png: bytes,
    *,
    worst_first: bool = False,
    thumbnail_side: int = 256,
) -> str:
    """A self-contained HTML contact sheet: per prompt, each backend's images side by side."""
    backends = list(quality)
    frames = [table.assign(backend=backend) for backend, table in quality.items() if len(table)]
    everything = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if everything.empty:
        prompt_ids: list[str] = []
    elif worst_first:
        # Worst first: a prompt's worst image across backends; unscored images count as worst.
        worst = (
            _numbers(everything, "clip_score").fillna(-1.0).groupby(everything["prompt_id"]).min()
        )
        prompt_ids = list(worst.sort_values(kind="stable").index)
    else:
        prompt_ids = sorted(everything["prompt_id"].unique())

    sections = []
    for prompt_id in prompt_ids:
        rows = everything[everything["prompt_id"] == prompt_id]
        originals = rows["original_prompt"].dropna() if "original_prompt" in rows else []
        original = next(iter(originals), "")
        enhanced = "".join(
            f"<li><b>{html.escape(b)}</b>: {html.escape(str(p))}</li>"
            for b, p in rows.groupby("backend")["prompt"].first().items()
        )
        columns = []
        for backend in backends:
            mine = rows[rows["backend"] == backend]
            if mine.empty:
                columns.append(f'<div class="backend"><h3>{html.escape(backend)}</h3>–</div>')
                continue
            order = ["clip_score", "image_index"] if worst_first else ["image_index"]
            mine = mine.sort_values(order, na_position="first")
            figures = [_image_figure(row, thumbnail_side) for row in mine.to_dict("records")]
            clips = clip_quality.get(backend, pd.DataFrame())
            if len(clips):
                mine_clips = clips[clips["prompt_id"] == prompt_id].sort_values("image_index")
                figures += [_clip_figure(r) for r in mine_clips.to_dict("records")]
            columns.append(
                f'<div class="backend"><h3>{html.escape(backend)}</h3>'
                f'<div class="items">{"".join(figures)}</div></div>'
            )
        sections.append(
            f'<section class="prompt" id="{html.escape(prompt_id)}">'
            f"<h2>{html.escape(prompt_id)}</h2>"
            f'<p class="original">{html.escape(str(original))}</p>'
            f"<details><summary>Enhanced prompts</summary><ul>{enhanced}</ul></details>"
            f'<div class="backends">{"".join(columns)}</div></section>'
        )

    summary_html = summary.to_html(
        index=False, classes="summary", float_format=lambda v: f"{v:.3g}", na_rep="–", border=0
    )
    order = "worst first (lowest CLIP score)" if worst_first else "by prompt id"
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(prompt_set)}: backend comparison</title>"
        f"<style>{STYLE.replace('THUMB', str(thumbnail_side))}</style></head><body>"
        f"<h1>{html.escape(prompt_set)}: backend comparison</h1>"
        f'<p class="meta">{len(prompt_ids)} prompts · {len(backends)} backends · ordered {order}'
        f" · {stamp}</p>"
        f'<img class="chart" alt="comparison chart" src="{data_uri(chart_png, "image/png")}">'
        f'<div class="table-wrap">{summary_html}</div>{"".join(sections)}</body></html>\n'
    )
