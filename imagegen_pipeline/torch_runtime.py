"""Torch and diffusers plumbing every model shares: device, dtype, memory, loading, placement.

Image backends, the video generator and the CLIP scorer import these side by side, so none of
them imports another to reach a helper. Torch is imported inside the functions: the model
modules import this one at load time of the Dagster definitions, which must stay torch-free.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagegen_pipeline.model_weights import ModelWeightsMissingError, missing_weights_message

logger = logging.getLogger(__name__)

DTYPE_NAMES = ("bfloat16", "float16", "float32")

if TYPE_CHECKING:
    import torch


def resolve_device(device: str) -> torch.device:
    """The torch device for ``device``; "auto" is CUDA when present, else the CPU."""
    import torch

    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    logger.warning("No CUDA device found: running on the CPU, which is orders of magnitude slower.")
    return torch.device("cpu")


def resolve_dtype(dtype: str, preferred: str, device: torch.device) -> torch.dtype:
    """The torch dtype for ``dtype``; "auto" keeps half precision for accelerators only."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    # Half-precision matmuls on the CPU are slow or missing; float32 is the safe choice there.
    return getattr(torch, preferred) if device.type == "cuda" else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """ "bfloat16" for torch.bfloat16, and so on."""
    return str(dtype).removeprefix("torch.")


def free_accelerator_memory() -> None:
    """Return cached blocks to the driver so the next model in this process has room."""
    import torch

    # Pipelines hold reference cycles, so their device tensors wait for a full collection; one
    # costs about half a second in a process with torch, diffusers and Dagster loaded. Without
    # an accelerator there is no driver cache to hand back, and the interpreter's own
    # collections free the host memory soon enough.
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA (and other accelerator) out-of-memory errors."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def module_bytes(*modules: Any) -> int:
    """Bytes of the parameters and buffers of torch modules (None entries are skipped)."""
    import torch

    total = 0
    for module in modules:
        if isinstance(module, torch.nn.Module):
            tensors = [*module.parameters(), *module.buffers()]
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def checkpoint_tensor_sizes(files: list[Path]) -> dict[str, int]:
    """Each tensor's element count by name (a nested dict's names joined with "."), read from
    checkpoint files (safetensors, or torch .pt/.bin) without loading the weights: safetensors
    headers, or a memory-mapped torch load."""
    import torch
    from safetensors import safe_open

    sizes: dict[str, int] = {}

    def add(value: Any, name: str) -> None:
        if isinstance(value, torch.Tensor):
            sizes[name] = value.numel()
        elif isinstance(value, dict):
            for key, item in value.items():
                add(item, f"{name}.{key}" if name else str(key))

    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as tensors:
                for name in tensors.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    shape = tensors.get_slice(name).get_shape()
                    sizes[name] = int(torch.Size(shape).numel())
        else:
            add(torch.load(file, map_location="cpu", mmap=True, weights_only=True), "")
    return sizes


def checkpoint_elements(files: list[Path]) -> int:
    """The tensor elements stored in checkpoint files, read without loading the weights."""
    return sum(checkpoint_tensor_sizes(files).values())


def pipeline_bytes(pipeline: Any) -> int:
    """Bytes of every torch module of a diffusers pipeline."""
    return module_bytes(*getattr(pipeline, "components", {}).values())


def local_model_folder(model: str, revision: str | None) -> Path | None:
    """The folder holding ``model``: itself when it is a folder, else its hub cache snapshot."""
    local = Path(model).expanduser()
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception:  # not in the cache (or not a repo id): the caller decides what that means
        return None


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
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

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


def place_pipeline(pipeline: Any, offload: str, device: torch.device) -> None:
    """Put ``pipeline`` on ``device``, or set up CPU offload towards it."""
    # Offload keeps only the running sub-model on the GPU ("model") or only the running layer
    # ("sequential": slowest, least memory); either replaces moving the whole pipeline. On the
    # CPU there is nothing to offload to.
    if offload == "model" and device.type != "cpu":
        pipeline.enable_model_cpu_offload(device=device)
    elif offload == "sequential" and device.type != "cpu":
        pipeline.enable_sequential_cpu_offload(device=device)
    else:
        pipeline.to(device)


class DiffusersModel:
    """A diffusers pipeline held by a model object: loaded once, placed, freed on demand.

    Image backends and the video generator share this; they add what they call it with.
    """

    pipeline: Any = None
    model_loads = 0  # how many times this object loaded its weights

    def load_pipeline(
        self,
        pipeline_class: type,
        settings: Any,
        *,
        dtype: torch.dtype,
        variant: str | None,
        offload: str,
        device: torch.device,
    ) -> Any:
        """Load ``settings.model`` (revision, allow_download) and place it on ``device``."""
        pipeline = load_diffusers_pipeline(
            pipeline_class,
            settings.model,
            revision=settings.revision,
            dtype=dtype,
            variant=variant,
            allow_download=settings.allow_download,
        )
        place_pipeline(pipeline, offload, device)
        pipeline.set_progress_bar_config(disable=True)
        self.model_loads += 1
        return pipeline

    def unload(self) -> None:
        """Free the pipeline and the accelerator memory it holds."""
        self.pipeline = None
        free_accelerator_memory()

    def weight_bytes(self) -> int:
        """Memory the loaded pipeline holds (what the warm-model cache budgets)."""
        return pipeline_bytes(self.pipeline) if self.pipeline is not None else 0


class PeakMemory:
    """Peak CUDA memory of a block of work, in MiB (None off CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib: float | None = None

    def __enter__(self) -> PeakMemory:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc_info: object) -> None:
        import torch

        if self.device.type == "cuda":
            # Kernels run asynchronously: wait for them so the time and the peak are real.
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
