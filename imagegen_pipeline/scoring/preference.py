"""What every human-preference scorer shares: one small interface and its common settings.

A scorer turns (image, prompt) pairs into one float each, higher meaning "people prefer it";
best-of-N ranks a prompt's candidates by it. Each scorer is one module (``clip_model``,
``hpsv2``, ``pickscore``, ``imagereward``) with a ``SPEC``, settings, ``build_tiny`` and a
class meeting :class:`PreferenceScorer`; ``registry.SCORERS`` lists them by the name prompt
rows use.
Scores of one pair never depend on the batch it was scored in.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from PIL import Image
from pydantic import Field

from imagegen_pipeline.model_settings import ModelSettings
from imagegen_pipeline.torch_runtime import (
    checkpoint_elements,
    free_accelerator_memory,
    module_bytes,
    resolve_device,
)


class PreferenceScorer(Protocol):
    """A scorer loaded once per step (through the warm model cache) and called in batches."""

    device: Any
    model_loads: int
    load_seconds: float

    @property
    def model_label(self) -> str: ...  # the model as recorded with every score

    @property
    def model_revision(self) -> str: ...  # its revision ("main" when none was pinned)

    def load(self) -> float: ...
    def unload(self) -> None: ...
    def weight_bytes(self) -> int: ...
    def planned_weight_bytes(self) -> int | None: ...
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]: ...


class PreferenceScorerSettings(ModelSettings):
    """What the preference scorers share: precision and batch size."""

    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="fp32 keeps scores comparable across machines"
    )
    batch_size: int = Field(16, description="images per forward pass; scores do not depend on it")

    def scorer_label(self, model_id: str | None = None) -> str:
        """The model as recorded with every score (and part of each score's reuse key)."""
        return model_id or self.model


TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class LoadedScorer:
    """What the scorer classes share: their settings, device and load counts, and how the
    loaded model is labelled, sized and freed. Subclasses load and score."""

    def __init__(self, config: PreferenceScorerSettings, model_id: str | None = None) -> None:
        if config.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.config = config
        self.model_id = model_id or config.model
        self.device = resolve_device(config.device)
        self.model: Any = None
        self.load_seconds = 0.0
        self.model_loads = 0

    @property
    def model_label(self) -> str:
        """The model as recorded with every score."""
        return self.model_id

    @property
    def model_revision(self) -> str:
        """The revision of the weights ("main" unless pinned)."""
        return self.config.revision or "main"

    def unload(self) -> None:
        """Free the model and the accelerator memory it holds."""
        self.model = None
        free_accelerator_memory()

    def weight_bytes(self) -> int:
        """Memory the loaded model holds (for the warm-model cache)."""
        return module_bytes(self.model)

    def weight_files(self) -> list[Path]:
        """The checkpoint files the model loads from, when known without loading it."""
        return []

    def weight_elements(self) -> int:
        """The tensor elements the loaded model will hold, read from its files without
        loading them (0 when they are not known before loading)."""
        files = self.weight_files()
        return checkpoint_elements(files) if files else 0

    def planned_weight_bytes(self) -> int | None:
        """The memory the model's weights will hold once loaded (what it holds, if loaded);
        None when its files are not known. Lets a step place it before loading it."""
        if self.model is not None:
            return self.weight_bytes()
        try:
            elements = self.weight_elements()
        except Exception:  # missing or unreadable weights: the load reports them, with the fix
            return None
        if not elements:
            return None
        import torch

        dtype = getattr(torch, TORCH_DTYPES[self.config.precision])
        return elements * dtype.itemsize
