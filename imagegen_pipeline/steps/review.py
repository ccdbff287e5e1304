"""What a reviewer looks at, Dagster-free: a prompt set's images with their scores, clips,
verdicts and lineage, filtered and sorted; shared by the review app and ``imagegen export``.

An image *slot* is one (backend, prompt id, image index). A rejected image may have been
replaced (its replacement's row names it in ``replaces``); the slot then shows the newest image
of the chain, with the earlier ones as its history. Until the best-of-N ``keepers`` asset
exists, every image is shown in gallery order (prompt, backend, index) and the verdict is the
only choice: a keep keeps, a reject leaves the image out of exports.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import pandas as pd

from imagegen_pipeline.lora import WEIGHT_FILE_NAMES
from imagegen_pipeline.records import EXISTING_STATUSES
from imagegen_pipeline.reviews import VerdictCache
from imagegen_pipeline.run_metadata import load_run_metadata
from imagegen_pipeline.storage import Storage

IMAGE_COLUMNS = [
    "backend",
    "prompt_id",
    "image_index",
    "image_id",
    "prompt",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "loras",
    "control",
    "seconds",
    "cost_usd",
    "path",
    "replaces",
    "recorded_at",
]
SCORE_COLUMNS = ["clip_score", "aesthetic"]
# From the ``keepers`` asset's table: the scorer's choice (after the reviewer's verdicts).
KEEPER_COLUMNS = ["kept", "rank", "scorer", "score", "below_gate"]
SORTS = {
    # Keepers first, by rank, the other candidates behind them (see the keepers asset).
    "gallery": (["prompt_id", "backend", "keeper_order", "rank", "image_index"], True),
    "score": (["clip_score"], False),
    "score_asc": (["clip_score"], True),
    "seconds": (["seconds"], False),
    "cost": (["cost_usd"], False),
}


def quality_table(
    storage: Storage, prompt_set: str, backend: str, asset: str = "quality"
) -> pd.DataFrame | None:
    """The last table of a partition of ``asset`` (the path defs/storage.py's IO manager
    writes: dimension values in the order of the dimension names, backend then set)."""
    path = storage.path("tables", asset, backend, f"{prompt_set}.parquet")
    try:
        return pd.read_parquet(io.BytesIO(storage.read_bytes(path)))
    except FileNotFoundError:
        return None


def lora_names(cell: object) -> str:
    """The adapters of a row's ``loras`` JSON as "name:scale, ..." for people."""
    if not isinstance(cell, str) or not cell:
        return ""
    return ", ".join(f"{lora_name(a['source'])}:{a['scale']:g}" for a in json.loads(cell))


def lora_name(source: str) -> str:
    """What people call an adapter: its file's name, or its folder's where the file has the
    standard name every diffusers LoRA folder uses."""
    parts = str(source).rstrip("/").rsplit("/", 2)
    return parts[-2] if parts[-1] in WEIGHT_FILE_NAMES and len(parts) > 1 else parts[-1]


def control_label(cell: object) -> str:
    """A row's ``control`` JSON as "canny:1 layout.png" (or "reference layout.png") for people."""
    if not isinstance(cell, str) or not cell:
        return ""
    control = json.loads(cell)
    name = str(control["image"]).rsplit("/", 1)[-1]
    if control.get("used_as") == "reference":
        return f"reference {name}"
    return f"{control['type']}:{control['scale']:g} {name}"


def generated_images(storage: Storage, prompt_set: str) -> pd.DataFrame:
    """Every existing image of a prompt set, one row each: generation facts, scores, clip and
    lineage (``replaced_by``; ``is_head`` for the newest image of a slot)."""
    rows = load_run_metadata(storage, "images", prompt_set=prompt_set)
    rows = rows[rows["status"].isin(EXISTING_STATUSES) & rows["path"].notna()]
    rows = rows.reindex(columns=IMAGE_COLUMNS).copy()
    frames = []
    for backend in rows["backend"].unique():
        scores = quality_table(storage, prompt_set, backend)
        if scores is not None and "clip_score" in scores:
            keep = ["image_id", *[c for c in SCORE_COLUMNS if c in scores]]
            frames.append(scores[keep].drop_duplicates("image_id"))
    scores = pd.concat(frames) if frames else pd.DataFrame(columns=["image_id"])
    rows = rows.merge(scores.reindex(columns=["image_id", *SCORE_COLUMNS]), how="left")
    keepers = [
        table.reindex(columns=["image_id", *KEEPER_COLUMNS]).drop_duplicates("image_id")
        for backend in rows["backend"].unique()
        if (table := quality_table(storage, prompt_set, backend, "keepers")) is not None
    ]
    keeper_facts = pd.concat(keepers) if keepers else pd.DataFrame(columns=["image_id"])
    rows = rows.merge(keeper_facts.reindex(columns=["image_id", *KEEPER_COLUMNS]), how="left")
    rows["keeper_order"] = rows["kept"].map({True: 0, False: 1}).fillna(1)
    clips = load_run_metadata(storage, "clips", prompt_set=prompt_set)
    clips = clips[clips["status"].isin(EXISTING_STATUSES)]
    clips = clips[["source_image_id", "path", "preview_path"]].rename(
        columns={"source_image_id": "image_id", "path": "clip_path"}
    )
    rows = rows.merge(clips.drop_duplicates("image_id"), how="left")
    replaced = rows.dropna(subset=["replaces"]).set_index("replaces")["image_id"]
    replaced = replaced[~replaced.index.duplicated(keep="last")]
    rows["replaced_by"] = rows["image_id"].map(replaced)
    rows["is_head"] = rows["replaced_by"].isna()
    rows["lora"] = rows["loras"].map(lora_names)
    rows["control_label"] = rows["control"].map(control_label)
    return rows.reset_index(drop=True)


def with_verdicts(rows: pd.DataFrame, latest: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with each image's latest verdict (verdict, note, reviewer, time; NaN if none)."""
    latest = latest.reindex(columns=["backend", "image_id", "verdict", "note", "reviewer", "time"])
    return rows.merge(latest, how="left", on=["backend", "image_id"])


def set_images(storage: Storage, prompt_set: str, verdicts: VerdictCache) -> pd.DataFrame:
    """``generated_images`` with their latest verdicts."""
    return with_verdicts(generated_images(storage, prompt_set), verdicts.latest(prompt_set))


def history_of(rows: pd.DataFrame, image_id: str) -> list[dict]:
    """The chain of images an image replaced, newest first (itself included)."""
    by_id = {row["image_id"]: row for row in rows.to_dict("records")}
    chain, seen = [], set()
    current = by_id.get(image_id)
    while current is not None and current["image_id"] not in seen:
        chain.append(current)
        seen.add(current["image_id"])
        previous = current.get("replaces")
        current = by_id.get(previous) if isinstance(previous, str) else None
    return chain


@dataclass(frozen=True)
class ReviewFilter:
    """What a reviewer narrowed a set's grid to."""

    backend: str = ""
    min_score: float | None = None
    max_score: float | None = None
    below_gate: bool = False
    unreviewed: bool = False
    lora: str = ""
    sort: str = "gallery"


def filtered(rows: pd.DataFrame, wanted: ReviewFilter, gate: float) -> pd.DataFrame:
    """The head images of ``rows`` that pass ``wanted``, in its order."""
    view = rows[rows["is_head"]]
    if wanted.backend:
        view = view[view["backend"] == wanted.backend]
    if wanted.min_score is not None:
        view = view[view["clip_score"] >= wanted.min_score]
    if wanted.max_score is not None:
        view = view[view["clip_score"] <= wanted.max_score]
    if wanted.below_gate:
        view = view[view["clip_score"] < gate]
    if wanted.unreviewed:
        view = view[view["verdict"].isna()]
    if wanted.lora:
        view = view[view["lora"].str.contains(wanted.lora, case=False, regex=False)]
    columns, ascending = SORTS.get(wanted.sort, SORTS["gallery"])
    return view.sort_values(columns, ascending=ascending, kind="stable", na_position="last")


def set_summary(rows: pd.DataFrame) -> dict[str, int]:
    """Counts of a set's head images: all, reviewed, kept, rejected, replaced (history)."""
    heads = rows[rows["is_head"]]
    return {
        "images": len(heads),
        "reviewed": int(heads["verdict"].notna().sum()),
        "kept": int((heads["verdict"] == "keep").sum()),
        "rejected": int((heads["verdict"] == "reject").sum()),
        "replaced": int((~rows["is_head"]).sum()),
    }


def prompt_sets(storage: Storage) -> list[str]:
    """The prompt sets that have image rows."""
    folder = storage.path("run_metadata", "images")
    return sorted({name.split("/", 1)[0] for name in storage.list_files(folder) if "/" in name})
