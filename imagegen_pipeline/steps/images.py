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
from typing import Any

import pandas as pd
from upath import UPath

from imagegen_pipeline.backends.base import ImageBackend, ImageRequest, ImageResult, RunSummary
from imagegen_pipeline.claims import partition_claim
from imagegen_pipeline.control import DEFAULT_CONTROL_SCALE, control_of
from imagegen_pipeline.image_files import (
    DEFAULT_PNG_COMPRESS_LEVEL,
    encode_png,
    read_png_record,
    verify_png,
)
from imagegen_pipeline.lora import adapters_of, describe
from imagegen_pipeline.model_settings import GenerationSettings, ImageTarget
from imagegen_pipeline.records import ImageRecord, facts_from_json, utc_now
from imagegen_pipeline.registry import backend_spec
from imagegen_pipeline.steps.skeleton import (
    DEFAULT_WRITER_THREADS,
    StepOutcome,
    StepPlace,
    run_step,
)
from imagegen_pipeline.steps.verify import VerifyMode, clips_made_from
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
    key: dict[str, Any] = {
        **asdict(settings),
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seed": request.seed,
        "width": request.width,
        "height": request.height,
    }
    if request.loras:  # by file content and scale: a changed LoRA file is other work
        key["loras"] = [[adapter.sha256, adapter.scale] for adapter in request.loras]
    if request.control:  # the map is a function of the image's bytes, its type and the size
        control = request.control
        key["control"] = [control.sha256, control.type, control.scale]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class PlannedImage:
    """An image the step is asked for: its request, content address and file."""

    request: ImageRequest
    image_id: str
    relative_path: str  # under the partition's images folder
    replaces: str | None = None  # a regenerated image: the image_id of the rejected one

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
        loras = adapters_of(row.get("lora") or "")
        control = control_of(
            row.get("control_image") or "",
            row.get("control_type") or "",
            float(row.get("control_scale") or DEFAULT_CONTROL_SCALE),
        )
        for index in range(int(row["num_images"])):
            request = ImageRequest(
                prompt_id=row["prompt_id"],
                image_index=index,
                prompt=row["enhanced_prompt"],
                negative_prompt=negative,
                seed=derive_seed(row["prompt_id"], index, csv_seed),
                width=width,
                height=height,
                loras=loras,
                control=control,
            )
            image_id = content_address(settings, request)
            name = f"{request.prompt_id}/{index:02d}_{image_id[:ADDRESS_CHARS]}.png"
            planned.append(PlannedImage(request, image_id, name))
    return planned


def control_map_name(item: PlannedImage) -> str:
    """The control map's file, beside its image: ``<index>_<address>.control.png``."""
    return item.relative_path.removesuffix(".png") + ".control.png"


@dataclass(frozen=True)
class ImagesStepContext:
    """Where one partition's images go and whose run makes them."""

    storage: Storage
    prompt_set: str
    run_id: str
    png_compress_level: int = DEFAULT_PNG_COMPRESS_LEVEL
    writer_threads: int = DEFAULT_WRITER_THREADS
    verify: VerifyMode = "size"


@dataclass
class ImagesKind:
    """Images as an output kind of the step skeleton: one PNG per planned image."""

    target: ImageTarget
    backend: Callable[[], ImageBackend]
    step: ImagesStepContext
    log: Callable[[str], None]
    table: str = "images"
    id_column: str = "image_id"

    @property
    def folder_parts(self) -> tuple[str, ...]:
        return ("images", self.step.prompt_set, self.target.settings.backend)

    @property
    def what(self) -> str:
        return f"images {self.step.prompt_set}/{self.target.settings.backend}"

    @property
    def control_use(self) -> str:
        """How the backend uses a row's control image: a ControlNet locally, else an input."""
        return "controlnet" if backend_spec(self.target.settings.backend).is_local else "reference"

    def key(self, item: PlannedImage) -> str:
        return item.relative_path

    def files(self, item: PlannedImage) -> tuple[str, ...]:
        return (item.relative_path,)

    def output_id(self, item: PlannedImage) -> str:
        return item.image_id

    def check(self, item: PlannedImage, data: bytes) -> None:
        verify_png(data)

    def recover(self, item: PlannedImage) -> dict[str, Any]:
        storage = self.step.storage
        png = storage.read_bytes(storage.path(*self.folder_parts, item.relative_path))
        return facts_from_json(read_png_record(png)[1])

    def derived(self, item: PlannedImage) -> list[tuple[tuple[str, ...], str]]:
        """The video clips made from the image, moved aside with it when it is damaged."""
        _, prompt_set, backend = self.folder_parts
        names = clips_made_from(self.step.storage, prompt_set, backend, item.relative_path)
        return [(("clips", prompt_set, backend), name) for name in names]

    def record(self, item: PlannedImage, status: str, run_id: str, **facts: Any) -> ImageRecord:
        settings, request = self.target.settings, item.request
        return ImageRecord(
            prompt_set=self.step.prompt_set,
            backend=settings.backend,
            model_id=settings.model_id,
            revision=settings.revision,
            steps=settings.steps,
            guidance=settings.guidance,
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
            loras=describe(request.loras) if request.loras else "",
            control=request.control.describe(self.control_use) if request.control else "",
            replaces=item.replaces,
            **facts,
        )

    def load(self) -> float:
        return self.backend().load()

    def run_summary(self) -> RunSummary:
        """The backend's summary of the ``produce`` that just made something."""
        return self.backend().run_summary()

    def produce(self, items: list[PlannedImage]) -> Iterator[tuple[PlannedImage, ImageResult]]:
        # By seed too: a replacement shares its prompt id and index with the image it replaces.
        by_key = {(*item.key, item.request.seed): item for item in items}
        for result in self.backend().generate([item.request for item in items]):
            request = result.request
            item = by_key[(request.prompt_id, request.image_index, request.seed)]
            if result.status == "failed":
                self.log(f"{request.prompt_id}[{request.image_index}] failed: {result.error}")
            yield item, result

    def write(self, item: PlannedImage, result: ImageResult) -> ImageRecord:
        details = result.details
        facts = {
            "error": result.error,
            "seconds": result.seconds,
            "device": self.backend().device,
            **{
                name: details.get(name)
                for name in (
                    "batch_size",
                    "peak_gpu_memory_mb",
                    "finish_reason",
                    "retries",
                    "prompt_tokens",
                    "output_tokens",
                    "cost_usd",
                )
            },
            "started_at": details.get("started_at") or utc_now(),
            "finished_at": utc_now(),
        }
        run_id = self.step.run_id
        if result.status != "ok" or result.image is None:
            return self.record(item, result.status, run_id, **facts)
        request = item.request
        parameters = {
            **asdict(self.target.settings),
            **{k: v for k, v in asdict(request).items() if k not in ("loras", "control")},
            **({"loras": json.loads(describe(request.loras))} if request.loras else {}),
            **(
                {"control": json.loads(request.control.describe(self.control_use))}
                if request.control
                else {}
            ),
            "image_id": item.image_id,
            **({"replaces": item.replaces} if item.replaces else {}),
        }
        png = encode_png(
            result.image,
            parameters,
            {**facts, "run_id": run_id},
            compress_level=self.step.png_compress_level,
        )
        path = self.step.storage.path(*self.folder_parts, item.relative_path)
        control_map = details.get("control_map")
        if control_map is not None:  # beside the image, for review; written first
            map_path = self.step.storage.path(*self.folder_parts, control_map_name(item))
            self.step.storage.write_bytes(map_path, encode_png(control_map, {}, {}))
        self.step.storage.write_bytes(path, png)
        sha256 = hashlib.sha256(png).hexdigest()
        files = {"path": str(path), "sha256": sha256, "bytes": len(png)}
        record = self.record(item, "ok", run_id, **facts, **files)
        if control_map is not None:
            # Of the map's pixels (not its PNG bytes): what the ControlNet saw.
            described = json.loads(record.control)
            described["map_sha256"] = hashlib.sha256(control_map.tobytes()).hexdigest()
            record.control = json.dumps(described)
        return record


def run_images_step(
    target: ImageTarget,
    backend: Callable[[], ImageBackend],
    planned: list[PlannedImage],
    step: ImagesStepContext,
    log: Callable[[str], None] = print,
    kind: type[ImagesKind] | None = None,
) -> StepOutcome[ImageRecord]:
    """Generate what is missing or damaged, write each PNG atomically, describe every image.

    ``backend()`` gives the backend that ``target`` describes; it is called only when some
    image is missing, so a step with nothing to make never creates (or imports) it.
    """
    place = StepPlace(
        step.storage,
        step.prompt_set,
        target.settings.backend,
        step.run_id,
        writer_threads=step.writer_threads,
        verify=step.verify,
    )
    # Held over listing and making: a second run of the partition waits, then finds it done.
    with partition_claim(step.storage, "images", step.prompt_set, target.settings.backend, log):
        maker = (kind or ImagesKind)(target, backend, step, log)  # BatchImagesKind: Gemini batch
        return run_step(maker, planned, place, log)
