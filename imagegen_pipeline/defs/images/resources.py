"""The local image backends as Dagster resources: every GPU setting is per-op configuration."""

from typing import Literal

import dagster as dg

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
