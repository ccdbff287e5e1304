"""One ``clips`` step, Dagster-free: choose source images, skip finished clips, make the rest.

Clips are content-addressed like images: a clip's file name carries the sha256 of its source
image's bytes and id, the SVD model and revision, size, frames, steps, fps, motion bucket, noise
augmentation, guidance and seed, so a re-run finds finished clips by name.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from PIL import Image

from imagegen_pipeline.atomic_files import sweep_temp_files
from imagegen_pipeline.image_generation import ADDRESS_CHARS, sha256_file
from imagegen_pipeline.run_metadata import utc_now
from imagegen_pipeline.video.svd import ClipResult, SvdGenerator, clip_address, clip_seed
from imagegen_pipeline.video.writers import write_mp4, write_preview

Selection = Literal["all", "first_n", "top_n"]
EXISTING_STATUSES = ("ok", "skipped_existing")  # rows whose file exists on disk


@dataclass(frozen=True)
class PlannedClip:
    """A clip the step is asked for: its source image, seed, content address and files."""

    source_image_id: str
    source_path: Path
    source_sha256: str
    prompt_id: str
    image_index: int
    seed: int
    clip_id: str
    path: Path
    preview_path: Path


@dataclass
class ClipStepOutcome:
    """The run-metadata rows of one step: one per clip, one for the step."""

    clip_rows: list[dict[str, Any]]
    step_row: dict[str, Any]
    counts: dict[str, int] = field(default_factory=dict)


def select_sources(
    images: pd.DataFrame, selection: Selection, n: int, score_column: str = "clip_score"
) -> pd.DataFrame:
    """The images to animate: all, or per prompt the first ``n`` or the ``n`` best by score.

    Only images that exist (and were scored, in a quality table) are candidates; blank ones
    (``is_blank``) never are.
    """
    if images.empty:
        return images
    usable = images[images["status"].isin(EXISTING_STATUSES)]
    if "scored" in usable.columns:
        usable = usable[usable["scored"].astype(bool)]
    if "is_blank" in usable.columns:
        usable = usable[~usable["is_blank"].eq(True)]
    if selection == "all":
        return usable.sort_values(["prompt_id", "image_index"]).reset_index(drop=True)
    if selection == "first_n":
        ordered = usable.sort_values(["prompt_id", "image_index"])
    elif selection == "top_n":
        if score_column not in usable.columns:
            raise ValueError(f"top_n needs a {score_column!r} column")
        # Best first; unscored images last, then by index so ties are stable.
        ordered = usable.sort_values(
            ["prompt_id", score_column, "image_index"],
            ascending=[True, False, True],
            na_position="last",
        )
    else:
        raise ValueError(f"unknown selection {selection!r}; use all, first_n or top_n")
    return ordered.groupby("prompt_id", sort=True).head(n).reset_index(drop=True)


def plan_clips(
    sources: pd.DataFrame, generator: SvdGenerator, clips_dir: Path
) -> list[PlannedClip]:
    """One planned clip per source image row."""
    settings = generator.settings
    planned = []
    for row in sources.to_dict("records"):
        source_path = Path(row["path"])
        recorded = row.get("sha256")
        source_sha256 = recorded if isinstance(recorded, str) else sha256_file(source_path)
        seed = clip_seed(row["image_id"])
        clip_id = clip_address(settings, source_sha256, row["image_id"], seed)
        stem = f"{int(row['image_index']):02d}_{clip_id[:ADDRESS_CHARS]}"
        folder = clips_dir / row["prompt_id"]
        planned.append(
            PlannedClip(
                source_image_id=row["image_id"],
                source_path=source_path,
                source_sha256=source_sha256,
                prompt_id=row["prompt_id"],
                image_index=int(row["image_index"]),
                seed=seed,
                clip_id=clip_id,
                path=folder / f"{stem}.mp4",
                preview_path=folder / f"{stem}.webp",
            )
        )
    return planned


def run_clips_step(
    generator: SvdGenerator,
    planned: list[PlannedClip],
    *,
    clips_dir: Path,
    prompt_set: str,
    backend: str,
    run_id: str,
    preview_side: int = 256,
    log: Callable[[str], None] = print,
) -> ClipStepOutcome:
    """Make the clips that are missing, write MP4 and preview atomically, describe every clip."""
    started_at = utc_now()
    started = time.perf_counter()
    swept = sweep_temp_files(clips_dir)
    if swept:
        log(f"Removed {swept} temporary file(s) left by an interrupted run.")
    settings = generator.settings
    base_row = {
        "run_id": run_id,
        "prompt_set": prompt_set,
        "backend": backend,
        "model_id": settings.model_id,
        "revision": settings.revision,
        "width": settings.width,
        "height": settings.height,
        "frames": settings.frames,
        "fps": settings.fps,
        "steps": settings.steps,
        "motion_bucket_id": settings.motion_bucket_id,
        "noise_aug_strength": settings.noise_aug_strength,
        "device": generator.device,
    }

    def describe(item: PlannedClip, result: ClipResult | None) -> dict[str, Any]:
        done = result is None or result.status == "ok"
        return {
            **base_row,
            "clip_id": item.clip_id,
            "source_image_id": item.source_image_id,
            "source_path": str(item.source_path),
            "prompt_id": item.prompt_id,
            "image_index": item.image_index,
            "seed": item.seed,
            "status": "skipped_existing" if result is None else result.status,
            "error": result.error if result else "",
            "memory_fallback": result.memory_fallback if result else None,
            "path": str(item.path) if done else None,
            "preview_path": str(item.preview_path) if done else None,
            "sha256": sha256_file(item.path) if done else None,
            "seconds": result.seconds if result else 0.0,
            "peak_gpu_memory_mb": result.peak_gpu_memory_mb if result else None,
            "started_at": started_at,
            "finished_at": utc_now(),
        }

    rows: dict[str, dict[str, Any]] = {}
    todo = []
    for item in planned:
        if item.path.exists() and item.preview_path.exists():
            rows[item.clip_id] = describe(item, None)
        else:
            todo.append(item)
    log(f"{len(planned)} clip(s) planned: {len(planned) - len(todo)} exist, {len(todo)} to make.")

    load_seconds = generator.load() if todo else 0.0
    for item in todo:
        with Image.open(item.source_path) as source:
            result = generator.generate(source, item.seed)
        if result.status == "ok":
            write_mp4(item.path, result.frames, settings.fps)
            write_preview(item.preview_path, result.frames, settings.fps, preview_side)
        else:
            log(f"Clip of {item.prompt_id}[{item.image_index}] failed: {result.error}")
        rows[item.clip_id] = describe(item, result)

    clip_rows = [rows[item.clip_id] for item in planned]
    counts = {status: 0 for status in ("ok", "skipped_existing", "failed")}
    for row in clip_rows:
        counts[row["status"]] += 1
    generation_seconds = sum(row["seconds"] for row in clip_rows)
    peaks = [r["peak_gpu_memory_mb"] for r in clip_rows if r["peak_gpu_memory_mb"] is not None]
    step_row = {
        "run_id": run_id,
        "asset": "clips",
        "prompt_set": prompt_set,
        "backend": backend,
        "model_id": settings.model_id,
        "revision": settings.revision,
        "device": generator.device,
        "requested": len(planned),
        "generated": counts["ok"],
        "skipped_existing": counts["skipped_existing"],
        "failed": counts["failed"],
        "blocked": 0,
        "skipped_budget": 0,
        "seconds": time.perf_counter() - started,
        "items_per_second": counts["ok"] / generation_seconds if generation_seconds else None,
        "model_loads": 1 if load_seconds else 0,
        "model_load_seconds": load_seconds,
        "peak_gpu_memory_mb": max(peaks) if peaks else None,
        "cost_usd": None,
        "started_at": started_at,
        "finished_at": utc_now(),
    }
    return ClipStepOutcome(clip_rows=clip_rows, step_row=step_row, counts=counts)
