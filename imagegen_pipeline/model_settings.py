"""What every model's settings share, declared once: plain pydantic models, no Dagster, no torch.

Each model's own settings class lives in its module, beside the model (``backends/*.py``,
``video/svd.py``, ``scoring/clip_model.py``), and subclasses these.

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

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class GenerationSettings:
    """Everything about the model that changes the pixels; part of every content address."""

    backend: str
    model_id: str
    revision: str
    steps: int
    guidance: float


@dataclass(frozen=True)
class ImageTarget:
    """What a backend's images are planned from, known from its settings alone: a step whose
    images all exist never creates the backend (nor imports torch for it)."""

    settings: GenerationSettings
    default_size: tuple[int, int]  # (width, height) of prompt rows that give no size
    supports_negative_prompt: bool  # else the negative prompt is recorded empty


# Tiny images and clips: the tiny models draw noise, so small sizes keep every entry point
# (demo, UI, tests) fast on a CPU without changing any code path.
TINY_IMAGE_SIDE = 256

LOCAL_DIR = "local-dir:"  # open_clip's prefix for a model folder
HF_HUB = "hf-hub:"  # open_clip's prefix for a Hugging Face Hub repo

Device = str  # "auto" (CUDA when present, else the CPU), "cpu", "cuda", "cuda:1", "mps"
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
Offload = Literal["auto", "none", "model", "sequential"]
Compile = Literal["off", "regional", "full"]  # the speed mode: backends/compilation.py


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
    controlnets: dict[str, str] | None = Field(
        None,
        description="ControlNet per control type (canny, depth, pose, none): a repo id or a "
        "folder; types not named keep the backend's defaults",
    )
    # Not in the content address: compiled and eager images agree within float tolerance.
    compile: Compile = Field(
        "off",
        description="speed mode: 'regional' compiles the denoiser's repeated blocks, 'full' the "
        "whole denoiser (torch.compile); LoRAs are then hotswapped so a switch does not recompile",
    )
    compile_backend: str = Field(
        "inductor",
        description="torch.compile backend: 'inductor' (generates kernels), or 'aot_eager' "
        "(traces only: checks graphs and recompiles without kernel build time)",
    )
    hotswap_rank: int | None = Field(
        None,
        description="under compile: the LoRA rank hotswap slots are padded to; None: the highest "
        "rank among the first step's LoRAs (a higher one later is refused)",
    )

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
