"""Every knob of every model, declared once: plain pydantic models, no Dagster, no torch.

What a model's outputs are planned from (sizes, content-address inputs, the scorer's label)
is derived here too, so a step can tell what exists before it creates the model.

The Dagster resources are these classes with ``dg.ConfigurableResource`` mixed in (see
``defs/resources.py``), so a field, its type, its default and its description exist here only.

Defaults that depend on which weights end up loaded say ``None`` or ``"auto"``: they are resolved
when a step starts (``model_resolution.resolve_settings``), from the registry's per-model
defaults and the project configuration. A run config that sets one field therefore never resets
another to a value that was only right for some other machine, and never drops a model path.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from imagegen_pipeline.backends.base import GenerationSettings, ImageTarget

LOCAL_DIR = "local-dir:"  # open_clip's prefix for a model folder
HF_HUB = "hf-hub:"  # open_clip's prefix for a Hugging Face Hub repo

Device = str  # "auto" (CUDA when present, else the CPU), "cpu", "cuda", "cuda:1", "mps"
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
Offload = Literal["auto", "none", "model", "sequential"]


class ModelSettings(BaseModel):
    """What every model shares: where its weights are and where it runs."""

    # Frozen: a setting read at the start of a step cannot change under it; copies are explicit.
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(
        "auto",
        description="'auto' (the IMAGEGEN_*_MODEL variable, else the real weights when present, "
        "else the tiny test model), a hub repo id, or a local folder in the same layout",
    )
    revision: str | None = Field(None, description="branch, tag or commit of a hub repo")
    device: Device = Field(
        "auto", description="'auto' (project's device: CUDA if present), 'cpu', 'cuda:1'"
    )
    allow_download: bool = Field(
        False, description="let a step download missing weights (else a clear error)"
    )


class DiffusersImageSettings(ModelSettings):
    """A diffusers text-to-image pipeline: precision, memory and sampling."""

    dtype: Dtype = Field(
        "auto", description="'auto': the model's own precision on a GPU, float32 on a CPU"
    )
    offload: Offload = Field(
        "auto",
        description="CPU offload; 'auto' picks none, model or sequential from free memory",
    )
    vae_slicing: bool = Field(False, description="decode a batch one image at a time (less memory)")
    vae_tiling: bool = Field(False, description="decode large images in tiles (less memory)")
    batch_size: int | None = Field(
        None, description="images per pipeline call; None: the largest that fits (halved on OOM)"
    )
    max_batch_size: int = Field(8, description="ceiling of the automatic batch size")
    steps: int = Field(1, description="denoising steps")
    guidance: float = Field(0.0, description="classifier-free guidance; 0 for distilled models")
    width: int | None = Field(None, description="size of rows without one; None: model's native")
    height: int | None = Field(None, description="size of rows without one; None: model's native")

    def image_target(self, backend: str, model_id: str) -> ImageTarget:
        """What ``backend``'s images are planned from with these (resolved) settings."""
        if self.width is None or self.height is None:
            raise ValueError("resolve the settings first: width and height must be set")
        return ImageTarget(
            GenerationSettings(
                backend, model_id, self.revision or "main", self.steps, self.guidance
            ),
            (self.width, self.height),
            self.uses_negative_prompt(),
        )

    def uses_negative_prompt(self) -> bool:
        """Whether the pipeline is given the negative prompt."""
        # FLUX.1-schnell is guidance-distilled: no classifier-free guidance for one to act on.
        return False


class FluxSchnellSettings(DiffusersImageSettings):
    """FLUX.1-schnell through diffusers' FluxPipeline (bf16, 4 steps, no guidance, 1024 px)."""

    steps: int = Field(4, description="denoising steps (schnell is distilled to 4)")
    max_sequence_length: int = Field(256, description="T5 tokens read from each prompt")


class SdxlTurboSettings(DiffusersImageSettings):
    """SDXL-Turbo through diffusers' StableDiffusionXLPipeline (fp16 files, 1 step, 512 px)."""

    steps: int = Field(1, description="denoising steps (1 to 4)")

    def uses_negative_prompt(self) -> bool:
        # The negative prompt only acts through classifier-free guidance, i.e. guidance > 1.
        return self.guidance > 1.0


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
    max_retries: int = Field(6, description="per image, on 408/429/5xx, timeouts, network errors")
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


class SvdSettings(ModelSettings):
    """Stable Video Diffusion XT image-to-video; None means the model card's value."""

    dtype: Dtype = Field("auto", description="'auto': float16 on a GPU, float32 on a CPU")
    offload: Literal["none", "model", "sequential"] = Field("none", description="CPU offload")
    forward_chunking: bool = Field(False, description="chunked UNet feed-forward: less memory")
    decode_chunk_size: int | None = Field(None, description="frames decoded at once (8)")
    width: int | None = Field(None, description="clip width (1024); the source is cropped to it")
    height: int | None = Field(None, description="clip height (576)")
    num_frames: int | None = Field(None, description="frames per clip (25 for XT)")
    steps: int | None = Field(None, description="denoising steps (25)")
    fps: int = Field(7, description="frame rate the model is conditioned on and the MP4 plays at")
    motion_bucket_id: int = Field(127, description="higher: more motion")
    noise_aug_strength: float = Field(0.02, description="noise on the conditioning image")
    min_guidance_scale: float = Field(1.0, description="guidance on the first frame")
    max_guidance_scale: float | None = Field(None, description="guidance on the last frame (3)")
    selection: Literal["all", "first_n", "top_n"] = Field(
        "first_n", description="which images of a prompt get a clip (top_n: by CLIP score)"
    )
    n: int = Field(1, description="clips per prompt for first_n and top_n")
    preview_side: int = Field(256, description="longest side of the animated WebP preview")


class ClipModelSettings(ModelSettings):
    """The CLIP model (open_clip) that scores images and video clips."""

    pretrained: str | None = Field("openai", description="weights tag of an open_clip model name")
    checkpoint: str | None = Field(None, description="a local weights file for the model name")
    quick_gelu: bool | None = Field(None, description="None: as the pretrained tag says")
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="fp32 keeps scores comparable"
    )
    batch_size: int = Field(32, description="images per forward pass; scores do not depend on it")
    workers: int = Field(4, description="threads decoding and measuring images ahead of the model")
    aesthetic_head: str | None = Field(None, description="LAION linear head weights file")

    def scorer_label(self, model_id: str | None = None) -> str:
        """The model as recorded with every score (and part of each score's reuse key)."""
        if model_id and model_id != self.model:
            return model_id
        if self.model.startswith((LOCAL_DIR, HF_HUB)) or not self.pretrained:
            return self.model
        return f"{self.model}/{self.pretrained}"


class EnhancerSettings(BaseModel):
    """How prompts are enhanced, per prompt set: "template" (offline), "gemini" or "ollama"."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    default_method: Literal["template", "gemini", "ollama"] = Field(
        "template", description="for prompt sets not named in method_by_prompt_set"
    )
    method_by_prompt_set: dict[str, str] = Field(
        default_factory=dict, description='e.g. {"product_shots": "gemini"}'
    )
    gemini_api_key: str | None = Field(
        None, repr=False, description="None: GEMINI_API_KEY, read when the step starts"
    )
    gemini_text_model: str = Field("gemini-2.5-flash", description="the model rewriting prompts")
    gemini_base_url: str | None = Field(None, description="another endpoint (a proxy, a test)")
    ollama_base_url: str = Field("http://127.0.0.1:11434", description="where ollama serve listens")
    ollama_model: str = Field("llama3.2", description="a model pulled into Ollama")
    timeout_seconds: float = Field(60.0, description="one call; a timed-out call is retried")
    max_attempts: int = Field(5, description="calls per prompt on 408/429/5xx, then the template")
    initial_backoff_seconds: float = Field(1.0, description="wait before the first retry")
    max_backoff_seconds: float = Field(60.0, description="ceiling of the doubling wait")
    cache_dir: str | None = Field(
        None, description="LLM answers; None: <storage>/cache/enhancements"
    )
