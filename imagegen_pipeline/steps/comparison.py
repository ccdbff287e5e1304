"""The backend comparison of one prompt set: a summary table, a bar chart and an HTML gallery.

Plain functions over the per-backend ``quality`` (image scores) and ``video_quality`` (video clip
scores) tables, with no Dagster, so the report can be built and tested anywhere. The gallery is one
self-contained HTML file: thumbnails, video clip previews and the chart are embedded as data URIs,
so it can be mailed, archived or opened from any folder. Its markup is the Jinja template
``templates/gallery.html.j2``, rendered with autoescaping on: every prompt, path and error message
is escaped by Jinja on the way out, none by hand. Files are read through a ``read_bytes`` callable
because they may live on an object store.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
from PIL import Image

from imagegen_pipeline.image_files import DECODE_ERRORS
from imagegen_pipeline.records import EXISTING_STATUSES

CHART_METRICS = [
    ("mean_clip_score", "Mean CLIP score (0-100)"),
    ("mean_aesthetic", "Mean CLIP aesthetic (0-1)"),
    ("seconds_per_image", "Seconds per image"),
    ("cost_per_image_usd", "Cost per image (USD)"),
]
GALLERY_TEMPLATE = "gallery.html.j2"
# Columns of a table row that say which run found or made the image, not what it is: a run
# with nothing to make changes them and nothing else.
RUN_BOOKKEEPING = ("run_id", "row_id", "recorded_at", "started_at", "finished_at", "seconds",
                   "device", "batch_size", "newly_scored")  # fmt: skip
MISSING = "–"  # shown for a value a row does not have
DETAIL_CHARS = 160  # of an error message, in a missing image's box

_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("imagegen_pipeline.steps", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,  # a misspelt field fails the render instead of vanishing
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


VERDICT_RANK = {"keep": 0, "reject": 2}  # unreviewed images: 1


def _missing(value: object) -> bool:
    """True for None and the NaN / NA that pandas puts in a column where a row has no value."""
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def _numbers(frame: pd.DataFrame, column: str) -> pd.Series:
    if column not in frame:
        return pd.Series(dtype=float)
    return pd.to_numeric(frame[column], errors="coerce")


def _scored(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty or "scored" not in frame:
        return frame.head(0)
    return frame[frame["scored"].astype(bool)]


def backend_summary(
    quality: Mapping[str, pd.DataFrame], video_quality: Mapping[str, pd.DataFrame]
) -> pd.DataFrame:
    """One row per backend: counts, CLIP and aesthetic scores, time and cost per image, and its
    video clips (``clips`` counts them; the stored comparison table has always named it so)."""
    rows = []
    for backend, table in quality.items():
        status = table["status"] if "status" in table else pd.Series(dtype=str)
        scored = _scored(table)
        scored_video_clips = _scored(video_quality.get(backend, pd.DataFrame()))
        rows.append(
            {
                "backend": backend,
                "images": int(status.isin(EXISTING_STATUSES).sum()),
                # Best-of-N keepers (the keepers table); a quality report alone has none.
                "keepers": int(table["kept"].eq(True).sum()) if "kept" in table else None,
                "below_gate": int(table["below_gate"].eq(True).sum()) if "kept" in table else None,
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
                "clips": len(scored_video_clips),
                "mean_source_similarity": _numbers(scored_video_clips, "source_similarity").mean(),
                "mean_temporal_consistency": _numbers(
                    scored_video_clips, "temporal_consistency"
                ).mean(),
            }
        )
    return pd.DataFrame(rows)


def steering_summary(quality: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per backend, LoRA set and control type: what each steering gave (images, CLIP
    and aesthetic scores); empty when no image of the set was steered."""
    frames = [table.assign(backend=backend) for backend, table in quality.items() if len(table)]
    everything = _scored(pd.concat(frames, ignore_index=True)) if frames else pd.DataFrame()
    columns = ["backend", "loras", "control", "images", "mean_clip_score", "mean_aesthetic"]
    if everything.empty:
        return pd.DataFrame(columns=columns)
    lora = everything.get("loras", pd.Series("", index=everything.index)).fillna("")
    control = everything.get("control", pd.Series("", index=everything.index)).fillna("")
    if not (lora.astype(bool) | control.astype(bool)).any():
        return pd.DataFrame(columns=columns)
    labelled = everything.assign(
        loras=[_lora_label(value) or "none" for value in lora],
        control=[_control_label(value) or "none" for value in control],
        clip=_numbers(everything, "clip_score"),
        aes=_numbers(everything, "aesthetic"),
    )
    grouped = labelled.groupby(["backend", "loras", "control"], sort=True)
    summary = grouped.agg(
        images=("image_id", "size"),
        mean_clip_score=("clip", "mean"),
        mean_aesthetic=("aes", "mean"),
    )
    return summary.reset_index()[columns]


def report_digest(
    prompt_set: str,
    frames: Mapping[str, pd.DataFrame],
    settings: Mapping[str, Any],
) -> str:
    """What a set's chart and gallery are drawn from: its tables (``frames`` by name, e.g.
    each backend's keepers with verdicts, the clips, the summary), the drawing ``settings``,
    and this module's code and the gallery template. Equal digests draw equal files (but for
    the page's "drawn at" stamp), so a run with nothing new can keep the files it has."""
    digest = hashlib.sha256(_drawing_code())
    digest.update(json.dumps([prompt_set, dict(settings)], sort_keys=True, default=str).encode())
    for name in sorted(frames):
        frame = frames[name].drop(columns=list(RUN_BOOKKEEPING), errors="ignore")
        frame = frame[sorted(frame.columns)]  # a run may add a step's columns in another order
        if "status" in frame:  # found again or made now: the same image
            exists = frame["status"].isin(EXISTING_STATUSES)
            frame = frame.assign(status=frame["status"].where(~exists, "exists"))
        digest.update(name.encode())
        digest.update(frame.to_csv(index=False).encode())
    return digest.hexdigest()


@functools.cache
def _drawing_code() -> bytes:
    """This module's code and the gallery template, read once per process."""
    template = Path(__file__).parent / "templates" / GALLERY_TEMPLATE
    return Path(__file__).read_bytes() + template.read_bytes()


def bar_chart_png(summary: pd.DataFrame, title: str) -> bytes:
    """A 2x2 bar chart of CLIP score, aesthetic, seconds and cost per image, by backend."""
    # Imported here: matplotlib costs half a second, which every Dagster process would pay.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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


def _jpeg_thumbnail_uri(data: bytes, side: int) -> str:
    """A JPEG thumbnail of an encoded image, as a data URI."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    return data_uri(buffer.getvalue(), "image/jpeg")


def _format(value: object, pattern: str) -> str:
    return MISSING if _missing(value) else pattern.format(value)


def _text(*values: object) -> str:
    """The first of ``values`` that is present and not empty, as text ("" when none is)."""
    return next((str(v) for v in values if not _missing(v) and str(v)), "")


def _flag(value: object) -> bool:
    return not _missing(value) and bool(value)


def _summary_cell(value: object) -> str:
    return _format(value, "{:.3g}" if isinstance(value, float) else "{}")


def _image_figure(
    row: Mapping[str, Any], side: int, read_bytes: Callable[[str], bytes]
) -> dict[str, Any]:
    """What the template shows for one image: its thumbnail and scores, or why there is none."""
    if not _flag(row.get("scored")) or not _text(row.get("path")):
        return {
            "kind": "missing",
            "status": _text(row.get("status"), "missing"),
            "detail": _text(row.get("error"), row.get("score_error"))[:DETAIL_CHARS],
        }
    try:
        src = _jpeg_thumbnail_uri(read_bytes(str(row["path"])), side)
    except DECODE_ERRORS as error:  # damaged or removed since it was scored: shown as such
        return {
            "kind": "missing",
            "status": "unreadable",
            "detail": f"{type(error).__name__}: {error}"[:DETAIL_CHARS],
        }
    laion = row.get("laion_aesthetic")
    # Local backends record no cost: they cost nothing per image.
    cost = row.get("generation_cost_usd")
    return {
        "kind": "image",
        "src": src,
        "alt": str(row["prompt_id"]),
        "title": f"seed {row.get('seed')} · {row.get('path')}",
        "index": int(row["image_index"]),
        "clip_score": _format(row.get("clip_score"), "{:.1f}"),
        "aesthetic": _format(row.get("aesthetic"), "{:.2f}"),
        "seconds": _format(row.get("generation_seconds"), "{:.2f}"),
        "cost": f"{0.0 if _missing(cost) else float(cost):.4f}",
        "laion": None if _missing(laion) else f"{laion:.2f}",
        "blank": _flag(row.get("is_blank")),
        "truncated": _flag(row.get("clip_truncated")),
        "loras": _lora_label(row.get("loras")),
        "control": _control_label(row.get("control")),
        "control_src": _control_map_uri(str(row["path"]), side, read_bytes)
        if _text(row.get("control"))
        else None,
        "choice": _choice_label(row),
    }


def _control_label(recorded: object) -> str:
    """The control an image was made with, as "canny ×0.8 layout.png" (empty for none)."""
    if not _text(recorded):
        return ""
    control = json.loads(str(recorded))
    name = Path(control["image"]).name
    if control.get("used_as") == "reference":
        return f"reference {name}"
    return f"{control['type']} ×{control['scale']:g} {name}"


def _control_map_uri(image_path: str, side: int, read_bytes: Callable[[str], bytes]) -> str | None:
    """The thumbnail of the control map saved beside an image (None when there is none)."""
    try:
        return _jpeg_thumbnail_uri(
            read_bytes(image_path.removesuffix(".png") + ".control.png"), side
        )
    except (OSError, *DECODE_ERRORS):
        return None


def _choice_label(row: Mapping[str, Any]) -> str:
    """A candidate's place under best-of-N: "KEEPER · hpsv2 0.281", "candidate 3 · ..."."""
    if "kept" not in row or _missing(row.get("kept")):
        return ""
    score = _format(row.get("score"), "{:.4g}")
    place = "KEEPER" if _flag(row.get("kept")) else f"candidate {_format(row.get('rank'), '{}')}"
    gate = " · below gate" if _flag(row.get("below_gate")) else ""
    return f"{place} · {row.get('scorer')} {score}{gate}"


def _lora_label(recorded: object) -> str:
    """The adapters an image was made with, as "brand.safetensors ×0.8" (empty for none)."""
    if not _text(recorded):
        return ""
    adapters = json.loads(str(recorded))
    return ", ".join(f"{Path(a['source']).name} ×{a['scale']:g}" for a in adapters)


def _video_clip_figure(
    row: Mapping[str, Any], read_bytes: Callable[[str], bytes]
) -> dict[str, Any] | None:
    """What the template shows for one video clip: its animated preview, or None without one."""
    preview = _text(row.get("preview_path"))
    if not preview:
        return None
    try:
        data = read_bytes(preview)
    except OSError:  # FileNotFoundError included: a preview never written, or since removed
        return None
    return {
        "kind": "video_clip",
        "src": data_uri(data, "image/webp"),
        "index": int(row["image_index"]),
        "temporal": _format(row.get("temporal_consistency"), "{:.3f}"),
        "source": _format(row.get("source_similarity"), "{:.3f}"),
    }


def _prompt_order(everything: pd.DataFrame, worst_first: bool) -> list[str]:
    if everything.empty:
        return []
    if not worst_first:
        return sorted(everything["prompt_id"].unique())
    # Worst first: a prompt's worst image across backends; unscored images count as worst.
    worst = _numbers(everything, "clip_score").fillna(-1.0).groupby(everything["prompt_id"]).min()
    return list(worst.sort_values(kind="stable").index)


def gallery_html(
    prompt_set: str,
    summary: pd.DataFrame,
    quality: Mapping[str, pd.DataFrame],
    video_quality: Mapping[str, pd.DataFrame],
    chart_png: bytes,
    *,
    steering: pd.DataFrame | None = None,
    read_bytes: Callable[[str], bytes],
    worst_first: bool = False,
    thumbnail_side: int = 256,
) -> str:
    """A self-contained HTML contact sheet: per prompt, each backend's images side by side.

    Every image and video clip preview is read with ``read_bytes(path)``; an image it cannot
    read or decode shows as "unreadable" with the error, a preview it cannot read is left out.
    """
    backends = list(quality)
    frames = [table.assign(backend=backend) for backend, table in quality.items() if len(table)]
    everything = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    prompt_ids = _prompt_order(everything, worst_first)

    sections = []
    for prompt_id in prompt_ids:
        rows = everything[everything["prompt_id"] == prompt_id]
        originals = rows["original_prompt"].dropna() if "original_prompt" in rows else []
        columns = []
        for backend in backends:
            mine = rows[rows["backend"] == backend]
            if mine.empty:
                columns.append({"name": backend, "figures": []})
                continue
            order = ["clip_score", "image_index"] if worst_first else ["image_index"]
            ascending = [True] * len(order)
            if "kept" in mine:  # keepers first, by rank; the other candidates behind them
                mine = mine.assign(_kept=mine["kept"].eq(True), _rank=mine["rank"])
                order, ascending = ["_kept", "_rank", *order], [False, True, *ascending]
            if "verdict" in mine:  # a reviewer's keep comes first, a reject last, whatever scored
                mine = mine.assign(verdict_rank=mine["verdict"].map(VERDICT_RANK).fillna(1))
                order, ascending = ["verdict_rank", *order], [True, *ascending]
            mine = mine.sort_values(order, ascending=ascending, na_position="first")
            figures = [
                _image_figure(row, thumbnail_side, read_bytes) for row in mine.to_dict("records")
            ]
            video_clips = video_quality.get(backend, pd.DataFrame())
            if len(video_clips):
                mine_video_clips = video_clips[video_clips["prompt_id"] == prompt_id]
                for row in mine_video_clips.sort_values("image_index").to_dict("records"):
                    figure = _video_clip_figure(row, read_bytes)
                    if figure is not None:
                        figures.append(figure)
            columns.append({"name": backend, "figures": figures})
        sections.append(
            {
                "prompt_id": str(prompt_id),
                "original": str(next(iter(originals), "")),
                "enhanced": [
                    (str(backend), str(prompt))
                    for backend, prompt in rows.groupby("backend")["prompt"].first().items()
                ],
                "backends": columns,
            }
        )

    return _TEMPLATES.get_template(GALLERY_TEMPLATE).render(
        prompt_set=prompt_set,
        prompt_count=len(prompt_ids),
        backend_count=len(backends),
        order="worst first (lowest CLIP score)" if worst_first else "by prompt id",
        stamp=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        chart_src=data_uri(chart_png, "image/png"),
        thumbnail_side=int(thumbnail_side),
        summary_columns=[str(column) for column in summary.columns],
        summary_rows=[
            [_summary_cell(value) for value in row]
            for row in summary.itertuples(index=False, name=None)
        ],
        steering_columns=[] if steering is None else [str(c) for c in steering.columns],
        steering_rows=[]
        if steering is None
        else [
            [_summary_cell(v) for v in row] for row in steering.itertuples(index=False, name=None)
        ],
        sections=sections,
    )
