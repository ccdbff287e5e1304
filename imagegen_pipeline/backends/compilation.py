"""Speed mode: ``torch.compile`` of a diffusers pipeline's denoiser, and what compiling cost.

The ``compile`` setting of every local diffusers model (``DiffusersImageSettings``):

- ``off`` (default): eager PyTorch, nothing to wait for.
- ``regional``: compile only the denoiser's repeated blocks (diffusers'
  ``compile_repeated_blocks``: FLUX's double and single transformer blocks, the UNet's
  ``BasicTransformerBlock``), or each block of its block lists for a model that does not name
  them. One block class compiles once and every copy reuses it, so compiling takes seconds
  where ``full`` takes minutes, for most of the speed-up.
- ``full``: compile the whole denoiser (``nn.Module.compile``, in place, so the pipeline and
  the LoRA loaders still see the model they know).

Compiling is lazy: ``torch.compile`` traces at the first denoiser call, after the LoRA hotswap
slots are loaded (``adapters.py``), so the first graph already holds them and a LoRA switch
later changes tensors, not the graph. Only the denoiser is compiled: it runs once per step and
image, the text encoders and the VAE once per image.

What compiling cost is read from torch._dynamo's own counters: graphs compiled and seconds
spent compiling. A graph compiled after the model's first call is a recompile (a guard that
failed: a new image size or batch, an adapter that changed the module structure). The counters
are per process, so a step counts the compiles of what ran in its process during the step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from imagegen_pipeline.model_settings import Compile

logger = logging.getLogger(__name__)

DENOISERS = ("transformer", "unet")  # the pipeline component that runs once per step


def denoiser_of(pipeline: Any) -> Any:
    """The pipeline's denoiser (FLUX's transformer, SDXL's UNet)."""
    for name in DENOISERS:
        model = getattr(pipeline, name, None)
        if model is not None:
            return model
    raise ValueError(f"{type(pipeline).__name__} has no {' or '.join(DENOISERS)} to compile")


def compile_denoiser(pipeline: Any, mode: Compile, backend: str) -> str:
    """Compile ``pipeline``'s denoiser in place as ``mode`` says, with torch.compile's
    ``backend``; returns what was compiled."""
    if mode == "off":
        return "nothing (compile off)"
    model = denoiser_of(pipeline)
    name = type(model).__name__
    if mode == "full":
        model.compile(backend=backend)
        return f"{name} (whole model)"
    if mode != "regional":
        raise ValueError(f"compile must be 'off', 'regional' or 'full', not {mode!r}")
    repeated = getattr(model, "_repeated_blocks", None)
    if repeated:
        model.compile_repeated_blocks(backend=backend)
        return f"{name} blocks {', '.join(repeated)} (compile_repeated_blocks)"
    # A model that does not name its repeated blocks: compile each member of its block lists.
    import torch

    blocks = [
        block
        for child in model.children()
        if isinstance(child, torch.nn.ModuleList)
        for block in child
    ]
    if not blocks:
        raise ValueError(f"{name} has no block list to compile regionally: use compile 'full'")
    for block in blocks:
        block.compile(backend=backend)
    return f"{name}: {len(blocks)} blocks of its block lists"


def _dynamo_totals() -> tuple[int, float]:
    """Graphs compiled and seconds spent compiling frames in this process, so far."""
    from torch._dynamo.utils import calculate_time_spent, counters

    return counters["stats"]["unique_graphs"], calculate_time_spent().get(
        "entire_frame_compile", 0.0
    )


@dataclass
class CompileWatch:
    """The compile mode of one pipeline and what compiling cost it, per generate call."""

    mode: Compile  # the settings' compile
    backend: str  # torch.compile's (the settings' compile_backend)
    compiled: str = ""  # what compile_denoiser compiled
    warm: bool = False  # the compiled model has run once: later graphs are recompiles
    graphs: int = 0  # graphs compiled during the current call
    recompiles: int = 0  # of which after the first call of the compiled model
    seconds: float = 0.0  # compiling, during the current call
    _start: tuple[int, float] = (0, 0.0)

    def apply(self, pipeline: Any) -> None:
        """Compile ``pipeline``'s denoiser (lazily: the first call traces it)."""
        self.compiled = compile_denoiser(pipeline, self.mode, self.backend)
        if self.mode != "off":
            logger.info("compile %s (%s): %s", self.mode, self.backend, self.compiled)

    def reset_counts(self) -> None:
        """Start counting graphs, recompiles and seconds afresh (one generate call)."""
        self.graphs = self.recompiles = 0
        self.seconds = 0.0
        if self.mode != "off":
            self._start = _dynamo_totals()

    def after_call(self) -> None:
        """Count what the pipeline call that just ended compiled."""
        if self.mode == "off":
            return
        graphs, seconds = _dynamo_totals()
        new = graphs - self._start[0] - self.graphs
        self.graphs += new
        self.seconds = seconds - self._start[1]
        if self.warm and new:
            self.recompiles += new
            logger.warning("compiled denoiser recompiled (%d graph(s))", new)
        self.warm = True

    def summary(self) -> dict[str, Any]:
        """What the step row records: the mode, compile seconds and recompiles."""
        return {
            "compile_mode": self.mode,
            "compile_seconds": self.seconds,
            "recompiles": self.recompiles,
        }
