"""The Gemini backend's settings: one pydantic model, no Dagster, no google-genai import."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from imagegen_pipeline.model_settings import GenerationSettings, ImageTarget


class GeminiSettings(BaseModel):
    """Gemini image generation (gemini-2.5-flash-image) through the google-genai SDK."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    api_key: str | None = Field(
        None, repr=False, description="None: GEMINI_API_KEY, read when the step starts"
    )
    model: str = Field("gemini-2.5-flash-image", description="a Gemini model that answers images")
    base_url: str | None = Field(None, description="another endpoint (a proxy, a test server)")
    timeout_seconds: float = Field(120.0, description="one HTTP call; a timed-out call is retried")
    max_concurrent_requests: int = Field(8, description="HTTP calls in flight at once")
    requests_per_minute: float = Field(60.0, description="pacing of every call: your RPM quota")
    max_attempts: int = Field(
        7, description="calls per image, the first included, on 408/429/5xx, timeouts, network"
    )
    initial_backoff_seconds: float = Field(1.0, description="first retry waits up to this")
    max_backoff_seconds: float = Field(60.0, description="ceiling of the exponential backoff")
    # Google's list prices for gemini-2.5-flash-image: input $0.30 per 1M tokens, image output
    # $30 per 1M (1290 tokens, about $0.039 an image), text output $2.50 per 1M.
    price_per_input_token_usd: float = Field(0.30e-6, description="USD per input token")
    price_per_output_token_usd: float = Field(30.0e-6, description="USD per image output token")
    price_per_output_text_token_usd: float = Field(2.50e-6, description="USD per text token")
    price_per_image_usd: float = Field(0.039, description="expected cost of one image (budget)")
    budget_usd: float | None = Field(None, description="per-run cap; None: no cap")

    def image_target(self, backend: str, model_id: str) -> ImageTarget:
        """What the hosted model's images are planned from: no revision to pin, no steps or
        guidance to set, no negative prompt (see the Gemini package docstring)."""
        return ImageTarget(
            GenerationSettings(backend, model_id, "api", 0, 0.0), (1024, 1024), False
        )
