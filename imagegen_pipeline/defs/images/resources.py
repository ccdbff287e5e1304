"""The local image backends as Dagster resources: every GPU setting is per-op configuration."""

import dataclasses
from typing import Literal

import dagster as dg
from pydantic import Field

from imagegen_pipeline.backends import gemini as gemini_api
from imagegen_pipeline.backends.diffusers_backend import DiffusersImageBackend
from imagegen_pipeline.backends.flux_schnell import FluxSchnellBackend, FluxSchnellConfig
from imagegen_pipeline.backends.sdxl_turbo import SdxlTurboBackend, SdxlTurboConfig


class DiffusersBackendResource(dg.ConfigurableResource):
    """Settings shared by the diffusers backends."""

    model: str  # hub repo id, or a local folder in the same diffusers layout
    revision: str | None = None  # branch, tag or commit of the hub repo; None means "main"
    device: str = "auto"  # "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1", "mps"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: model's own on GPU
    offload: Literal["none", "model", "sequential"] = "none"  # CPU offload to fit small GPUs
    vae_slicing: bool = False  # decode a batch one image at a time (less peak memory)
    vae_tiling: bool = False  # decode large images in tiles (less peak memory)
    batch_size: int = 1  # images per pipeline call; halved automatically on out-of-memory
    steps: int = 1  # denoising steps
    guidance: float = 0.0  # classifier-free guidance scale; 0 for the distilled models
    width: int | None = None  # size of rows without one; None for the model's native size
    height: int | None = None
    allow_download: bool = False  # let a step download missing weights (else: a clear error)

    def _config_fields(self) -> dict:
        return {
            name: getattr(self, name)
            for name in (
                "model", "revision", "device", "dtype", "offload", "vae_slicing",
                "vae_tiling", "batch_size", "steps", "guidance", "allow_download",
            )
        }  # fmt: skip

    def _sized(self, backend: DiffusersImageBackend) -> DiffusersImageBackend:
        backend.default_width = self.width or backend.default_width
        backend.default_height = self.height or backend.default_height
        return backend


class FluxSchnellResource(DiffusersBackendResource):
    """FLUX.1-schnell through diffusers' FluxPipeline (bf16, 4 steps, 1024 px)."""

    model: str = "black-forest-labs/FLUX.1-schnell"
    batch_size: int = 4
    steps: int = 4
    max_sequence_length: int = 256  # T5 tokens read from each prompt

    def create_backend(self) -> FluxSchnellBackend:
        """A backend with this configuration, not yet loaded."""
        config = FluxSchnellConfig(
            **self._config_fields(), max_sequence_length=self.max_sequence_length
        )
        return self._sized(FluxSchnellBackend(config))


class SdxlTurboResource(DiffusersBackendResource):
    """SDXL-Turbo through diffusers' StableDiffusionXLPipeline (fp16 weights, 1 step, 512 px)."""

    model: str = "stabilityai/sdxl-turbo"
    batch_size: int = 8
    steps: int = 1

    def create_backend(self) -> SdxlTurboBackend:
        """A backend with this configuration, not yet loaded."""
        return self._sized(SdxlTurboBackend(SdxlTurboConfig(**self._config_fields())))


class GeminiResource(dg.ConfigurableResource):
    """Gemini image generation (gemini-2.5-flash-image) through the google-genai SDK."""

    # GEMINI_API_KEY: default_resources() passes dg.EnvVar("GEMINI_API_KEY") when it is set,
    # so runs of the local backends never need it; repr=False keeps it out of every repr.
    api_key: str | None = Field(default=None, repr=False)
    model: str = gemini_api.DEFAULT_MODEL  # any Gemini model that answers with images
    base_url: str | None = None  # another endpoint (a proxy, a test server); None for Google
    timeout_seconds: float = 120.0  # one HTTP call; a timed-out call is retried
    max_concurrent_requests: int = 8  # HTTP calls in flight at once
    requests_per_minute: float = 60.0  # pacing of all calls, retries included: your RPM quota
    max_retries: int = 6  # per image, on 408/429/5xx, timeouts and network errors
    initial_backoff_seconds: float = 1.0  # first retry waits up to this (full jitter)
    max_backoff_seconds: float = 60.0  # ceiling of the exponential backoff
    # Prices per token (Google's list prices for gemini-2.5-flash-image): input $0.30 per 1M,
    # image output $30 per 1M (1290 tokens, ~$0.039 per image), text output $2.50 per 1M.
    price_per_input_token_usd: float = gemini_api.PRICE_PER_INPUT_TOKEN_USD
    price_per_output_token_usd: float = gemini_api.PRICE_PER_OUTPUT_TOKEN_USD
    price_per_output_text_token_usd: float = gemini_api.PRICE_PER_OUTPUT_TEXT_TOKEN_USD
    price_per_image_usd: float = gemini_api.PRICE_PER_IMAGE_USD  # expected cost, for the budget
    budget_usd: float | None = None  # per-run cap: no request is sent past it; None: no cap

    def create_backend(self) -> gemini_api.GeminiBackend:
        """A backend with this configuration; raises GeminiKeyMissingError without a key."""
        settings = {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(gemini_api.GeminiConfig)
            if field.name != "api_key"
        }
        config = gemini_api.GeminiConfig(api_key=self.api_key or "", **settings)
        return gemini_api.GeminiBackend(config)
