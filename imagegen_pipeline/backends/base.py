"""The one small interface every image backend implements.

A backend turns :class:`ImageRequest` objects into :class:`ImageResult` objects, one per request.
It knows nothing about Dagster, files or Parquet: the images step plans the requests (seeds,
content addresses), skips what already exists, and writes the outputs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from PIL import Image

from imagegen_pipeline.control import ControlInput
from imagegen_pipeline.lora import LoraAdapter
from imagegen_pipeline.model_settings import GenerationSettings, ImageTarget
from imagegen_pipeline.model_spec import ModelSpec
from imagegen_pipeline.records import ImageStatus


@dataclass(frozen=True)
class ImageRequest:
    """One image to make: a prompt, its seed and its size."""

    prompt_id: str
    image_index: int
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    loras: tuple[LoraAdapter, ...] = ()  # adapters to apply, with their scales
    control: ControlInput | None = None  # a ControlNet's image, type and scale (or reference)


@dataclass
class ImageResult:
    """What a backend made of one request."""

    request: ImageRequest
    status: ImageStatus
    image: Image.Image | None = None
    error: str = ""
    seconds: float = 0.0
    # Backend-specific facts for the run metadata: finish_reason, tokens, cost_usd,
    # peak_gpu_memory_mb, batch_size, retries, started_at ...
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSummary:
    """What a backend reports after ``generate``: totals for the step's metadata, and lines the
    step log should warn about (a reached budget, an exhausted quota)."""

    metadata: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # The metadata keys that count (loads, seconds, tokens): a step that calls ``generate``
    # several times (best-of-N rounds, replacements first) adds them up; other keys (the
    # batch size, the memory plan) describe the call and the later call's stand.
    totals: frozenset[str] = frozenset()

    def followed_by(self, later: RunSummary) -> RunSummary:
        """This summary and a later call's, as one step's."""
        metadata = {**self.metadata, **later.metadata}
        for key in self.totals & later.totals:
            metadata[key] = _added(self.metadata.get(key), later.metadata.get(key))
        warnings = list(dict.fromkeys(self.warnings + later.warnings))
        return RunSummary(metadata, warnings, self.totals | later.totals)


def _added(first: Any, second: Any) -> Any:
    if first is None or second is None:
        return second if first is None else first
    if isinstance(first, bool):  # a flag (budget reached): set if either call set it
        return first or second
    if isinstance(first, dict):  # counts by key (errors by HTTP status)
        return {k: first.get(k, 0) + second.get(k, 0) for k in {**first, **second}}
    return first + second


class ImageBackend(ABC):
    """Load a model once, generate many requests, free it."""

    spec: ClassVar[ModelSpec]  # everything the project knows about the backend (its SPEC)
    supports_negative_prompt: bool = False

    @property
    def name(self) -> str:
        """The backend's name: partition key, CSV value, resource key."""
        return self.spec.name

    @property
    @abstractmethod
    def settings(self) -> GenerationSettings:
        """Model id, revision, steps and guidance, as they go into content addresses."""

    @property
    @abstractmethod
    def default_size(self) -> tuple[int, int]:
        """(width, height) of requests whose prompt row gives no size."""

    @property
    def target(self) -> ImageTarget:
        """What this backend's images are planned from."""
        return ImageTarget(self.settings, self.default_size, self.supports_negative_prompt)

    @property
    def device(self) -> str:
        """Where the work runs, as recorded in the run metadata."""
        return "remote"

    def load(self) -> float:
        """Load the model if it is not loaded; returns the seconds it took (0 when nothing)."""
        return 0.0

    @abstractmethod
    def generate(self, requests: Sequence[ImageRequest]) -> Iterator[ImageResult]:
        """Yield one result per request, in the order they complete (not necessarily the
        order of ``requests``): a remote backend answers whichever request returns first."""

    def unload(self) -> None:  # noqa: B027 - remote backends hold nothing to free
        """Free the model and any accelerator memory it holds."""

    def weight_bytes(self) -> int:
        """Memory the loaded model holds (what the warm-model cache budgets); 0 for none."""
        return 0

    def leave_room(self, other_bytes: int) -> None:  # noqa: B027 - a hosted model holds none
        """Keep ``other_bytes`` of the device free for another model of the step (a gate's
        scorer, loaded beside the generator) when planning memory."""

    def run_summary(self) -> RunSummary:
        """Totals of the last ``generate`` call (tokens, cost, retries, ...) and warnings."""
        return RunSummary()
