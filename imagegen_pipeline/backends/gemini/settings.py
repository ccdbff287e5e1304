"""The Gemini backend's settings: one pydantic model, no Dagster, no google-genai import."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from imagegen_pipeline.backends.gemini.prices import BATCH_DISCOUNT, ModelPrice, model_price
from imagegen_pipeline.model_settings import GenerationSettings, ImageTarget


class GeminiSettings(BaseModel):
    """Gemini image generation through the google-genai SDK, online or through the Batch API."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    api_key: str | None = Field(
        None, repr=False, description="None: GEMINI_API_KEY, read when the step starts"
    )
    model: str = Field(
        "gemini-2.5-flash-image",
        description="a Gemini image model; one of backends/gemini/prices.py, or give its prices",
    )
    base_url: str | None = Field(None, description="another endpoint (a proxy, a test server)")
    timeout_seconds: float = Field(120.0, description="one HTTP call; a timed-out call is retried")
    max_concurrent_requests: int = Field(8, description="HTTP calls in flight at once")
    requests_per_minute: float = Field(60.0, description="pacing of every call: your RPM quota")
    max_attempts: int = Field(
        7, description="calls per image, the first included, on 408/429/5xx, timeouts, network"
    )
    initial_backoff_seconds: float = Field(1.0, description="first retry waits up to this")
    max_backoff_seconds: float = Field(60.0, description="ceiling of the exponential backoff")
    # None: the model's list price from the one table, backends/gemini/prices.py.
    price_per_input_token_usd: float | None = Field(None, description="USD per input token")
    price_per_output_token_usd: float | None = Field(None, description="USD per image token")
    price_per_output_text_token_usd: float | None = Field(None, description="USD per text token")
    price_per_image_usd: float | None = Field(
        None, description="expected online cost of one image (the budget's reserve)"
    )
    budget_usd: float | None = Field(None, description="per-run cap; None: no cap")
    # Appended for the Batch API (issue 19); the earlier fields keep their order.
    tokens_per_image: int | None = Field(None, description="output tokens of one image")
    mode: Literal["online", "batch"] = Field(
        "online", description="online: generateContent per image; batch: the Batch API, half price"
    )
    batch_max_requests: int = Field(
        100, ge=1, description="images per batch job (about 2 MB of results each; bounded)"
    )
    batch_poll_seconds: float = Field(30.0, description="between two looks at an open batch job")
    batch_wait_seconds: float = Field(
        60.0, description="a step waits this long, then leaves open jobs to the collect sensor"
    )
    batch_deadline_hours: float = Field(
        24.0, description="a batch job still open this long after creation is cancelled"
    )
    batch_retry: Literal["batch", "online", "none"] = Field(
        "batch", description="failed keys of a batch: a smaller follow-up batch, online, or not"
    )
    overflow_local_backend: str | None = Field(
        None, description="rows with backends=any run here first; None: the first local backend"
    )
    overflow_queue_limit_seconds: float = Field(
        3600.0, description="rows go local while its estimated queue is under this, then Gemini"
    )
    overflow_seconds_per_image: float = Field(
        10.0, description="the local backend's seconds per image until a step row measured it"
    )

    def image_target(self, backend: str, model_id: str) -> ImageTarget:
        """What the hosted model's images are planned from: no revision to pin, no steps or
        guidance to set, no negative prompt (see the Gemini package docstring)."""
        return ImageTarget(
            GenerationSettings(backend, model_id, "api", 0, 0.0), (1024, 1024), False
        )

    def prices(self) -> ModelPrice:
        """The model's online prices: the table's, under any set here; raises
        ``UnknownModelPriceError`` for a model the table lacks unless all are set."""
        return model_price(
            self.model,
            input_per_token=self.price_per_input_token_usd,
            image_output_per_token=self.price_per_output_token_usd,
            text_output_per_token=self.price_per_output_text_token_usd,
            tokens_per_image=self.tokens_per_image,
        )

    @property
    def price_factor(self) -> float:
        """What this mode pays of the online price: half in batch mode."""
        return BATCH_DISCOUNT if self.mode == "batch" else 1.0

    def expected_image_usd(self) -> float:
        """The expected cost of one image in this mode (what the budget reserves per image)."""
        online = self.price_per_image_usd
        return (online if online is not None else self.prices().per_image) * self.price_factor
