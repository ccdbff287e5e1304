"""The one small interface every image backend implements.

A backend turns a batch of :class:`ImageRequest` into :class:`ImageResult`, one per request, in
order. It knows nothing about Dagster, files or Parquet: the pipeline plans the requests (seeds,
content addresses), skips what already exists and writes the outputs.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from PIL import Image

ImageStatus = Literal["ok", "failed", "blocked", "skipped_budget", "skipped_existing"]

# Seeds live in [0, 2**31) so the same number works for torch generators and for the
# Gemini API, whose seed field is an int32.
SEED_MODULUS = 2**31


@dataclass(frozen=True)
class GenerationSettings:
    """Everything about the model that changes the pixels; part of every content address."""

    backend: str
    model_id: str
    revision: str
    steps: int
    guidance: float


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


@dataclass
class ImageResult:
    """What a backend made of one request."""

    request: ImageRequest
    status: ImageStatus
    image: Image.Image | None = None
    error: str = ""
    seconds: float = 0.0
    # Backend-specific facts for the run metadata: finish_reason, tokens, cost_usd,
    # peak_gpu_memory_mb, retries, ...
    details: dict[str, Any] = field(default_factory=dict)


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


class ImageBackend(ABC):
    """Load a model once, generate many batches, free it."""

    name: str
    default_width: int
    default_height: int
    supports_negative_prompt: bool = False
    # Longest prompt, in tokens, that the backend's text encoder reads; None when unbounded.
    token_limit: int | None = None

    @property
    @abstractmethod
    def settings(self) -> GenerationSettings:
        """Model id, revision, steps and guidance, as they go into content addresses."""

    @property
    def device(self) -> str:
        """Where the work runs, as recorded in the run metadata."""
        return "remote"

    def load(self) -> float:
        """Load the model; returns the seconds it took (0 when there is nothing to load)."""
        return 0.0

    @abstractmethod
    def generate(self, requests: Sequence[ImageRequest]) -> Iterator[ImageResult]:
        """Yield one result per request, in order, as soon as each is ready."""

    def unload(self) -> None:  # noqa: B027 - remote backends hold nothing to free
        """Free the model and any accelerator memory it holds."""

    def __enter__(self) -> ImageBackend:
        self.load()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unload()
