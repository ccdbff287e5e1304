"""One ``images`` step of one partition, Dagster-free: plan, skip what exists, generate the rest.

Outputs are content-addressed: an image's file name carries the sha256 of everything that makes
its pixels (backend, model and revision, prompt, negative prompt, seed, size, steps, guidance),
so a re-run finds finished work by name and a changed input can never reuse a stale file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import pandas as pd
from upath import UPath

from imagegen_pipeline.backends.base import (
    GenerationSettings,
    ImageBackend,
    ImageRequest,
    ImageResult,
    ImageTarget,
)
from imagegen_pipeline.claims import partition_claim
from imagegen_pipeline.image_files import DEFAULT_PNG_COMPRESS_LEVEL, encode_png, read_png_record
from imagegen_pipeline.records import ImageRecord, facts_from_json, utc_now
from imagegen_pipeline.run_metadata import FinishedOutputs, RunMetadataWriter, finished_outputs
from imagegen_pipeline.steps.skeleton import (
    DEFAULT_WRITER_THREADS,
    StepOutcome,
    run_generation_step,
)
from imagegen_pipeline.storage import Storage

ADDRESS_CHARS = 16  # 64 bits of the sha256 in file names: collisions need ~4 billion images
# Seeds live in [0, 2**31) so the same number works for torch generators and for the
# Gemini API, whose seed field is an int32.
SEED_MODULUS = 2**31


def derive_seed(prompt_id: str, image_index: int, csv_seed: int | None = None) -> int:
    """The seed of image ``image_index`` of a prompt.

    A seed given in the CSV is used for the first image and incremented for the next ones, so
    a user who asks for seed 42 gets 42 exactly. Without one, the seed is a hash of the prompt
    id and index: stable across runs, machines and Python hash randomisation.
    """
    if csv_seed is not None:
        return (csv_seed + image_index) % SEED_MODULUS
    digest = hashlib.sha256(f"{prompt_id}:{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_MODULUS


def content_address(settings: GenerationSettings, request: ImageRequest) -> str:
    """A sha256 over every input that changes the image; equal addresses mean equal work."""
    key = {
        **asdict(settings),
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seed": request.seed,
        "width": request.width,
        "height": request.height,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class PlannedImage:
    """An image the step is asked for: its request, content address and file."""

    request: ImageRequest
    image_id: str
    relative_path: str  # under the partition's images folder

    @property
    def key(self) -> tuple[str, int]:
        """(prompt id, image index): one image of one prompt."""
        return self.request.prompt_id, self.request.image_index


def images_folder(storage: Storage, prompt_set: str, backend: str) -> UPath:
    """The folder of one partition's PNGs."""
    return storage.path("images", prompt_set, backend)


def plan_images(enhanced: pd.DataFrame, target: ImageTarget) -> list[PlannedImage]:
    """Every image the backend of ``target`` should make for the rows of ``enhanced`` that
    list it (``target``: ``backend.target``, or the settings' ``image_target`` before any
    backend exists)."""
    planned = []
    settings = target.settings
    default_width, default_height = target.default_size
    for row in enhanced.to_dict("records"):
        if settings.backend not in list(row["backends"]):
            continue
        csv_seed = None if pd.isna(row["seed"]) else int(row["seed"])
        width = default_width if pd.isna(row["width"]) else int(row["width"])
        height = default_height if pd.isna(row["height"]) else int(row["height"])
        # Record the negative prompt only where the backend uses it: the address stays honest.
        negative = row["negative_prompt"] if target.supports_negative_prompt else ""
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
            name = f"{request.prompt_id}/{index:02d}_{image_id[:ADDRESS_CHARS]}.png"
            planned.append(PlannedImage(request, image_id, name))
    return planned


@dataclass(frozen=True)
class ImagesStepContext:
    """Where one partition's images go and whose run makes them."""

    storage: Storage
    prompt_set: str
    run_id: str
    png_compress_level: int = DEFAULT_PNG_COMPRESS_LEVEL
    writer_threads: int = DEFAULT_WRITER_THREADS


def run_images_step(
    target: ImageTarget,
    backend: Callable[[], ImageBackend],
    planned: list[PlannedImage],
    step: ImagesStepContext,
    log: Callable[[str], None] = print,
) -> StepOutcome[ImageRecord]:
    """Generate what is missing, write each PNG atomically, and describe every image.

    ``backend()`` gives the backend that ``target`` describes; it is called only when some
    image is missing, so a step with nothing to make never creates (or imports) it.
    """
    settings = target.settings
    # One run at a time per partition: a second one waits, then lists and finds the work done.
    with partition_claim(step.storage, "images", step.prompt_set, settings.backend, log):
        storage = step.storage
        folder = images_folder(storage, step.prompt_set, settings.backend)
        swept = storage.sweep_temp_files(folder)
        if swept:
            log(f"Removed {swept} temporary file(s) left by an interrupted run.")
        on_disk = storage.list_files(folder)  # one listing, not one probe per image
        made_before = (
            finished_outputs(
                storage, "images", "image_id", prompt_set=step.prompt_set, backend=settings.backend
            )
            if on_disk
            else FinishedOutputs({})
        )
        metadata = RunMetadataWriter(
            storage,
            "images",
            run_id=step.run_id,
            prompt_set=step.prompt_set,
            backend=settings.backend,
        )
        base = {
            "prompt_set": step.prompt_set,
            "backend": settings.backend,
            "model_id": settings.model_id,
            "revision": settings.revision,
            "steps": settings.steps,
            "guidance": settings.guidance,
        }

        def record(item: PlannedImage, status: str, run_id: str, **facts: object) -> ImageRecord:
            request = item.request
            return ImageRecord(
                **base,
                run_id=run_id,
                image_id=item.image_id,
                prompt_id=request.prompt_id,
                image_index=request.image_index,
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                seed=request.seed,
                width=request.width,
                height=request.height,
                status=status,
                **facts,  # type: ignore[arg-type]
            )

        def describe_existing(item: PlannedImage) -> Iterator[ImageRecord]:
            path = folder / item.relative_path
            size = on_disk[item.relative_path]
            if item.image_id not in made_before:
                # Made by a run killed before its row was flushed: the PNG carries that row.
                png = storage.read_bytes(path)
                _, facts = read_png_record(png)
                facts = facts_from_json(facts)
                made_by = facts.pop("run_id", step.run_id)
                sha256 = hashlib.sha256(png).hexdigest()
                yield record(
                    item,
                    "ok",
                    made_by,
                    **facts,
                    path=str(path),
                    sha256=sha256,
                    bytes=len(png),
                    recovered=True,
                )
            else:
                sha256 = made_before.sha256_now(storage, path, item.image_id, size, log)
            yield record(
                item,
                "skipped_existing",
                step.run_id,
                path=str(path),
                sha256=sha256,
                bytes=size,
                started_at=utc_now(),
                finished_at=utc_now(),
            )

        def generate(items: list[PlannedImage]) -> Iterator[tuple[PlannedImage, ImageResult]]:
            by_key = {item.key: item for item in items}
            for result in backend().generate([item.request for item in items]):
                item = by_key[(result.request.prompt_id, result.request.image_index)]
                request = item.request
                if result.status == "failed":
                    log(f"{request.prompt_id}[{request.image_index}] failed: {result.error}")
                yield item, result

        def write(item: PlannedImage, result: ImageResult) -> ImageRecord:
            details = result.details
            facts = {
                "error": result.error,
                "seconds": result.seconds,
                "device": backend().device,
                "batch_size": details.get("batch_size"),
                "peak_gpu_memory_mb": details.get("peak_gpu_memory_mb"),
                "finish_reason": details.get("finish_reason"),
                "retries": details.get("retries"),
                "prompt_tokens": details.get("prompt_tokens"),
                "output_tokens": details.get("output_tokens"),
                "cost_usd": details.get("cost_usd"),
                "started_at": details.get("started_at") or utc_now(),
                "finished_at": utc_now(),
            }
            if result.status != "ok" or result.image is None:
                return record(item, result.status, step.run_id, **facts)
            parameters = {**asdict(settings), **asdict(item.request), "image_id": item.image_id}
            png = encode_png(
                result.image,
                parameters,
                {**facts, "run_id": step.run_id},
                compress_level=step.png_compress_level,
            )
            path = folder / item.relative_path
            storage.write_bytes(path, png)
            sha256 = hashlib.sha256(png).hexdigest()
            return record(
                item, "ok", step.run_id, **facts, path=str(path), sha256=sha256, bytes=len(png)
            )

        return run_generation_step(
            what=f"images {step.prompt_set}/{settings.backend}",
            planned=planned,
            key=lambda item: item.key,
            is_done=lambda item: item.relative_path in on_disk,
            describe_existing=describe_existing,
            load=lambda: backend().load(),
            generate=generate,
            write=write,
            metadata=metadata,
            log=log,
            writer_threads=step.writer_threads,
        )
