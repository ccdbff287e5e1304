"""What the local diffusers backends share: loading, device and dtype, batching, out-of-memory.

Subclasses say which pipeline class and repo they use and how one batch is called; this module
does the rest the same way for all of them.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from transformers.utils import logging as transformers_logging

from imagegen_pipeline.backends.base import (
    GenerationSettings,
    ImageBackend,
    ImageRequest,
    ImageResult,
)
from imagegen_pipeline.model_weights import ModelWeightsMissingError, missing_weights_message

logger = logging.getLogger(__name__)

Offload = Literal["none", "model", "sequential"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class DiffusersConfig:
    """How a diffusers backend loads and runs; every field has a per-backend default."""

    model: str  # hub repo id or local folder in the diffusers layout
    revision: str | None = None  # branch, tag or commit of a hub repo; None for "main"
    device: str = "auto"  # "auto" picks CUDA when present, else the CPU (with a warning)
    dtype: str = "auto"  # "auto": the model's own precision on a GPU, float32 on the CPU
    offload: Offload = "none"
    vae_slicing: bool = False
    vae_tiling: bool = False
    batch_size: int = 1
    steps: int = 1
    guidance: float = 0.0
    allow_download: bool = False  # steps load local files only unless this is set


def resolve_device(device: str) -> torch.device:
    """The torch device for ``device``; "auto" is CUDA when present, else the CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    logger.warning("No CUDA device found: running on the CPU, which is orders of magnitude slower.")
    return torch.device("cpu")


def resolve_dtype(dtype: str, preferred: torch.dtype, device: torch.device) -> torch.dtype:
    """The torch dtype for ``dtype``; "auto" keeps half precision for accelerators only."""
    if dtype != "auto":
        return DTYPES[dtype]
    # Half-precision matmuls on the CPU are slow or missing; float32 is the safe choice there.
    return preferred if device.type == "cuda" else torch.float32


def free_accelerator_memory() -> None:
    """Return cached blocks to the driver so the next model in this process has room."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_diffusers_pipeline(
    pipeline_class: type,
    model: str,
    *,
    revision: str | None,
    dtype: torch.dtype,
    variant: str | None,
    allow_download: bool,
) -> Any:
    """``pipeline_class.from_pretrained`` with one clear error when the weights are missing."""
    # Progress bars would fill every step's compute log with carriage returns.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    local = Path(model).expanduser()
    if local.exists():
        model = str(local)
    elif model.startswith(("/", ".", "~")):
        raise ModelWeightsMissingError(missing_weights_message(model, revision))
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "revision": revision,
        "local_files_only": not allow_download,
    }
    try:
        try:
            return pipeline_class.from_pretrained(model, variant=variant, **kwargs)
        except (OSError, ValueError) as variant_error:
            if variant is None or "variant" not in str(variant_error).lower():
                raise
            # A local export or fine-tune often ships full-precision files only.
            logger.info("No %s variant in %s; loading the default weights.", variant, model)
            return pipeline_class.from_pretrained(model, **kwargs)
    except OSError as exc:
        raise ModelWeightsMissingError(missing_weights_message(model, revision, str(exc))) from None


def place_pipeline(pipeline: Any, offload: Offload, device: torch.device) -> None:
    """Put ``pipeline`` on ``device``, or set up CPU offload towards it."""
    # Offload keeps only the running sub-model on the GPU ("model") or only the running
    # layer ("sequential", slowest, least memory); either replaces moving the whole pipeline.
    if offload == "model":
        pipeline.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipeline.enable_sequential_cpu_offload(device=device)
    else:
        pipeline.to(device)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA (and other accelerator) out-of-memory errors."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class DiffusersImageBackend(ImageBackend):
    """A text-to-image diffusers pipeline, loaded once and called once per batch."""

    pipeline_class: ClassVar[type]
    preferred_dtype: ClassVar[torch.dtype]
    variant: ClassVar[str | None] = None

    def __init__(self, config: DiffusersConfig) -> None:
        self.config = config
        self.pipeline: Any = None
        self.batch_size = config.batch_size
        self.model_loads = 0
        self._device = resolve_device(config.device)
        self._dtype = resolve_dtype(config.dtype, self.preferred_dtype, self._device)

    @property
    def settings(self) -> GenerationSettings:
        return GenerationSettings(
            backend=self.name,
            model_id=self.config.model,
            revision=self.config.revision or "main",
            steps=self.config.steps,
            guidance=self.config.guidance,
        )

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def dtype(self) -> torch.dtype:
        """The precision the pipeline runs in."""
        return self._dtype

    def load(self) -> float:
        if self.pipeline is not None:
            return 0.0
        started = time.perf_counter()
        pipeline = load_diffusers_pipeline(
            self.pipeline_class,
            self.config.model,
            revision=self.config.revision,
            dtype=self._dtype,
            variant=self.variant,
            allow_download=self.config.allow_download,
        )
        place_pipeline(pipeline, self.config.offload, self._device)
        # Decode a batch one image at a time / in tiles: less peak memory at a small cost.
        if self.config.vae_slicing:
            pipeline.vae.enable_slicing()
        if self.config.vae_tiling:
            pipeline.vae.enable_tiling()
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline
        self.model_loads += 1
        return time.perf_counter() - started

    def unload(self) -> None:
        self.pipeline = None
        free_accelerator_memory()

    def pipeline_kwargs(self, batch: Sequence[ImageRequest]) -> dict[str, Any]:
        """Backend-specific arguments of one pipeline call (the prompts are added here)."""
        return {}

    def generate(self, requests: Sequence[ImageRequest]) -> Iterator[ImageResult]:
        """Batches of up to ``batch_size`` same-size requests, one pipeline call per batch.

        Out of memory halves the batch and retries, down to one image; any other failure of a
        batch retries its images one by one, so one bad prompt fails alone.
        """
        self.load()
        by_size: dict[tuple[int, int], list[ImageRequest]] = {}
        for request in requests:
            by_size.setdefault((request.width, request.height), []).append(request)
        for same_size in by_size.values():
            pending = deque(
                same_size[i : i + self.batch_size]
                for i in range(0, len(same_size), self.batch_size)
            )
            while pending:
                batch = pending.popleft()
                if len(batch) > self.batch_size:  # planned before an out-of-memory halving
                    pending.extendleft(
                        reversed(
                            [
                                batch[i : i + self.batch_size]
                                for i in range(0, len(batch), self.batch_size)
                            ]
                        )
                    )
                    continue
                try:
                    images, seconds, peak_mb = self._call(batch)
                except Exception as exc:
                    if len(batch) > 1:
                        if is_out_of_memory(exc):
                            free_accelerator_memory()
                            self.batch_size = max(1, len(batch) // 2)
                            logger.warning(
                                "Out of memory at batch %d; retrying at %d.",
                                len(batch),
                                self.batch_size,
                            )
                            halves = [batch[: self.batch_size], batch[self.batch_size :]]
                        else:
                            halves = [[request] for request in batch]
                        pending.extendleft(reversed(halves))
                        continue
                    if is_out_of_memory(exc):
                        free_accelerator_memory()
                    yield ImageResult(batch[0], "failed", error=f"{type(exc).__name__}: {exc}")
                    continue
                for request, image in zip(batch, images, strict=True):
                    yield ImageResult(
                        request,
                        "ok",
                        image=image,
                        seconds=seconds / len(batch),
                        details={"peak_gpu_memory_mb": peak_mb, "batch_size": len(batch)},
                    )

    def _call(self, batch: Sequence[ImageRequest]) -> tuple[list[Image.Image], float, float | None]:
        on_cuda = self._device.type == "cuda"
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(self._device)
        # One CPU generator per image: each image's initial noise depends on its own seed
        # alone, so any image can be regenerated by itself, on any device, in any batch.
        generators = [torch.Generator("cpu").manual_seed(request.seed) for request in batch]
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.pipeline(
                prompt=[request.prompt for request in batch],
                generator=generators,
                num_inference_steps=self.config.steps,
                guidance_scale=self.config.guidance,
                width=batch[0].width,
                height=batch[0].height,
                output_type="pil",
                **self.pipeline_kwargs(batch),
            )
        if on_cuda:
            torch.cuda.synchronize(self._device)
        seconds = time.perf_counter() - started
        peak_mb = torch.cuda.max_memory_allocated(self._device) / 2**20 if on_cuda else None
        return list(output.images), seconds, peak_mb
