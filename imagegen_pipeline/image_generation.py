"""One ``images`` step, Dagster-free: plan the images, skip those that exist, generate the rest.

Outputs are content-addressed: an image's file name carries the sha256 of everything that makes
its pixels (backend, model and revision, prompt, negative prompt, seed, size, steps, guidance),
so a re-run finds finished work by name and a changed input can never reuse a stale file.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from imagegen_pipeline.atomic_files import encode_png, sweep_temp_files, write_bytes_atomic
from imagegen_pipeline.backends.base import (
    ImageBackend,
    ImageRequest,
    ImageResult,
    content_address,
    derive_seed,
)
from imagegen_pipeline.run_metadata import utc_now

ADDRESS_CHARS = 16  # 64 bits of the sha256 in file names: collisions need ~4 billion images


@dataclass(frozen=True)
class PlannedImage:
    """An image the step is asked for: its request, content address and file."""

    request: ImageRequest
    image_id: str
    path: Path


@dataclass
class StepOutcome:
    """The run-metadata rows of one step: one per image, one for the step."""

    image_rows: list[dict[str, Any]]
    step_row: dict[str, Any]
    counts: dict[str, int] = field(default_factory=dict)


def plan_images(
    enhanced: pd.DataFrame, backend: ImageBackend, images_dir: Path
) -> list[PlannedImage]:
    """Every image ``backend`` should make for the rows of ``enhanced`` that list it."""
    planned = []
    settings = backend.settings
    for row in enhanced.to_dict("records"):
        if backend.name not in list(row["backends"]):
            continue
        csv_seed = None if pd.isna(row["seed"]) else int(row["seed"])
        width = backend.default_width if pd.isna(row["width"]) else int(row["width"])
        height = backend.default_height if pd.isna(row["height"]) else int(row["height"])
        # Record the negative prompt only where the backend uses it: the address stays honest.
        negative = row["negative_prompt"] if backend.supports_negative_prompt else ""
        for index in range(int(row["num_images"])):
            request = ImageRequest(
                prompt_id=row["prompt_id"],
                image_index=index,
                prompt=row["enhanced_prompt"],
                negative_prompt=negative,
                seed=derive_seed(row["prompt_id"], index, csv_seed),
                width=width,
                height=height,
            )
            image_id = content_address(settings, request)
            path = images_dir / request.prompt_id / f"{index:02d}_{image_id[:ADDRESS_CHARS]}.png"
            planned.append(PlannedImage(request, image_id, path))
    return planned


def png_text_chunks(backend: ImageBackend, planned: PlannedImage) -> dict[str, str]:
    """The generation parameters embedded in each PNG, enough to make the image again."""
    parameters = {
        **asdict(backend.settings),
        **asdict(planned.request),
        "image_id": planned.image_id,
    }
    return {
        "parameters": json.dumps(parameters, sort_keys=True),
        "prompt": planned.request.prompt,
        "seed": str(planned.request.seed),
        "Software": "imagegen-pipeline",
    }


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_images_step(
    backend: ImageBackend,
    planned: list[PlannedImage],
    *,
    images_dir: Path,
    prompt_set: str,
    run_id: str,
    log: Callable[[str], None] = print,
) -> StepOutcome:
    """Generate what is missing, write each PNG atomically, and describe every image."""
    started_at = utc_now()
    started = time.perf_counter()
    swept = sweep_temp_files(images_dir)
    if swept:
        log(f"Removed {swept} temporary file(s) left by an interrupted run.")
    settings = backend.settings
    base_row = {
        "run_id": run_id,
        "prompt_set": prompt_set,
        "backend": settings.backend,
        "model_id": settings.model_id,
        "revision": settings.revision,
        "steps": settings.steps,
        "guidance": settings.guidance,
    }
    rows: dict[tuple[str, int], dict[str, Any]] = {}

    def describe(
        item: PlannedImage, result: ImageResult, path: Path | None, digest: str | None = None
    ) -> dict[str, Any]:
        request = item.request
        details = result.details
        return {
            **base_row,
            "image_id": item.image_id,
            "prompt_id": request.prompt_id,
            "image_index": request.image_index,
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "seed": request.seed,
            "width": request.width,
            "height": request.height,
            "status": result.status,
            "error": result.error,
            "path": str(path) if path else None,
            "sha256": digest or (sha256_file(path) if path else None),
            "seconds": result.seconds,
            "device": backend.device,
            "peak_gpu_memory_mb": details.get("peak_gpu_memory_mb"),
            "finish_reason": details.get("finish_reason"),
            "retries": details.get("retries"),
            "prompt_tokens": details.get("prompt_tokens"),
            "output_tokens": details.get("output_tokens"),
            "cost_usd": details.get("cost_usd"),
            "started_at": details.get("started_at", started_at),
            "finished_at": utc_now(),
        }

    todo: list[PlannedImage] = []
    for item in planned:
        if item.path.exists():
            rows[(item.request.prompt_id, item.request.image_index)] = describe(
                item, ImageResult(item.request, "skipped_existing"), item.path
            )
        else:
            todo.append(item)
    log(
        f"{len(planned)} image(s) planned: {len(planned) - len(todo)} exist, "
        f"{len(todo)} to generate."
    )

    load_seconds = 0.0
    if todo:
        by_key = {(item.request.prompt_id, item.request.image_index): item for item in todo}
        load_seconds = backend.load()
        for result in backend.generate([item.request for item in todo]):
            key = (result.request.prompt_id, result.request.image_index)
            item = by_key[key]
            path = digest = None
            if result.status == "ok" and result.image is not None:
                png = encode_png(result.image, png_text_chunks(backend, item))
                write_bytes_atomic(item.path, png)
                path, digest = item.path, hashlib.sha256(png).hexdigest()
            elif result.status == "failed":
                log(f"{item.request.prompt_id}[{item.request.image_index}] failed: {result.error}")
            rows[key] = describe(item, result, path, digest)

    image_rows = [rows[(p.request.prompt_id, p.request.image_index)] for p in planned]
    counts = {
        status: 0 for status in ("ok", "skipped_existing", "failed", "blocked", "skipped_budget")
    }
    for row in image_rows:
        counts[row["status"]] += 1
    seconds = time.perf_counter() - started
    generation_seconds = sum(row["seconds"] or 0.0 for row in image_rows)
    peaks = [
        row["peak_gpu_memory_mb"] for row in image_rows if row["peak_gpu_memory_mb"] is not None
    ]
    costs = [row["cost_usd"] for row in image_rows if row["cost_usd"] is not None]
    step_row = {
        "run_id": run_id,
        "asset": "images",
        "prompt_set": prompt_set,
        "backend": settings.backend,
        "model_id": settings.model_id,
        "revision": settings.revision,
        "device": backend.device,
        "requested": len(planned),
        "generated": counts["ok"],
        "skipped_existing": counts["skipped_existing"],
        "failed": counts["failed"],
        "blocked": counts["blocked"],
        "skipped_budget": counts["skipped_budget"],
        "seconds": seconds,
        "items_per_second": counts["ok"] / generation_seconds if generation_seconds else None,
        "model_loads": 1 if load_seconds else 0,
        "model_load_seconds": load_seconds,
        "peak_gpu_memory_mb": max(peaks) if peaks else None,
        "cost_usd": sum(costs) if costs else None,
        "started_at": started_at,
        "finished_at": utc_now(),
    }
    return StepOutcome(image_rows=image_rows, step_row=step_row, counts=counts)
