"""ControlNets beside a loaded diffusers pipeline: one model per control type, loaded on first use.

The ControlNet pipeline is built with ``from_pipe`` from the loaded text-to-image pipeline, so it
shares its modules (and their LoRA adapters) instead of loading the base model again; each
ControlNet loads once per type and stays with the warm model for later steps. A tiny base model
(random weights, tests) gets tiny ControlNets built beside it in the real repos' layout
(``config.json`` + ``diffusion_pytorch_model.safetensors``).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagegen_pipeline.lora import safetensors_shapes
from imagegen_pipeline.model_weights import ModelWeightsMissingError
from imagegen_pipeline.torch_runtime import local_model_folder, module_bytes, place_pipeline

# Builds a tiny ControlNet for the tiny base model in the first folder into the second one.
TinyControlNetBuilder = Callable[[Path, Path], None]


@dataclass
class ControlNets:
    """The ControlNet pipelines of one base pipeline, by control type, and what they cost."""

    base: Any  # the loaded text-to-image pipeline
    backend: str
    pipeline_class_name: str  # e.g. StableDiffusionXLControlNetPipeline
    model_class_name: str  # e.g. ControlNetModel
    sources: Mapping[str, str]  # control type -> repo id or folder
    dtype: Any
    device: Any
    offload: str
    allow_download: bool
    tiny_base: Path | None = None  # a tiny base model: tiny ControlNets are built beside it
    build_tiny: TinyControlNetBuilder | None = None
    pipelines: dict[str, Any] = field(default_factory=dict)
    loads: int = 0
    load_seconds: float = 0.0

    def pipeline_for(self, control_type: str) -> Any:
        """The pipeline that steers the base model with the ControlNet of ``control_type``."""
        if control_type not in self.pipelines:
            import diffusers

            started = time.perf_counter()
            controlnet = self._load(control_type)
            pipeline_class = getattr(diffusers, self.pipeline_class_name)
            pipeline = pipeline_class.from_pipe(self.base, controlnet=controlnet)
            # from_pipe moves no module: the new ControlNet is placed like the rest (on the
            # CPU it already is where it runs).
            if self.offload != "none" or self.device.type != "cpu":
                place_pipeline(pipeline, self.offload, self.device)
            pipeline.set_progress_bar_config(disable=True)
            self.pipelines[control_type] = pipeline
            self.loads += 1
            self.load_seconds += time.perf_counter() - started
        return self.pipelines[control_type]

    def source(self, control_type: str) -> str:
        """The repo id or folder of ``control_type``'s ControlNet (``none``: canny's unless set)."""
        source = self.sources.get(control_type)
        if source is None and control_type == "none":
            source = self.sources.get("canny")
        if source is None:
            raise ValueError(
                f"{self.backend} has no {control_type} ControlNet: set "
                f"models.{self.backend}.controlnets.{control_type} in imagegen.toml "
                "(a repo id or a folder)"
            )
        return source

    def planned_elements(self, control_types: Iterable[str]) -> int:
        """Parameters the ControlNets of ``control_types`` add once loaded, read from their
        safetensors headers (no torch); those already loaded and those not on this machine
        (their load fails next, with the clear message) count nothing."""
        total = 0
        for control_type in set(control_types) - set(self.pipelines):
            folder = self._folder(control_type)
            files = sorted(folder.glob("diffusion_pytorch_model*.safetensors")) if folder else []
            # fp16 variant files and the plain ones hold the same parameters: count one set.
            plain = [f for f in files if ".fp16." not in f.name] or files
            total += sum(
                math.prod(shape) for f in plain for shape in safetensors_shapes(f).values()
            )
        return total

    def weight_bytes(self) -> int:
        """Memory the loaded ControlNets hold (the base pipeline's modules are shared)."""
        return module_bytes(*(pipeline.controlnet for pipeline in self.pipelines.values()))

    def reset_counts(self) -> None:
        """Start counting loads and their seconds afresh."""
        self.loads, self.load_seconds = 0, 0.0

    def _folder(self, control_type: str) -> Path | None:
        """The local folder of ``control_type``'s ControlNet (None when it is not here)."""
        if self.tiny_base is not None and self.build_tiny is not None:
            return self._tiny(control_type)
        return local_model_folder(self.source(control_type), None)

    def _load(self, control_type: str) -> Any:
        import diffusers

        model_class = getattr(diffusers, self.model_class_name)
        if self.tiny_base is not None and self.build_tiny is not None:
            source = str(self._tiny(control_type))
        else:
            source = self.source(control_type)
        try:
            return model_class.from_pretrained(
                source, torch_dtype=self.dtype, local_files_only=not self.allow_download
            )
        except OSError as error:
            raise ModelWeightsMissingError(
                f"{self.backend}: the {control_type} ControlNet {source!r} is not on this "
                "machine: run `imagegen models pull` where there is a network, or set "
                f"models.{self.backend}.controlnets.{control_type} to a local folder ({error})"
            ) from None

    def _tiny(self, control_type: str) -> Path:
        """The tiny ControlNet of ``control_type``, built once beside the tiny base model."""
        assert self.tiny_base is not None and self.build_tiny is not None
        final = self.tiny_base.parent / f"{self.tiny_base.name}-controlnet-{control_type}"
        if (final / "config.json").is_file():
            return final
        # Built in a sibling temporary folder and renamed: readers see all of it or nothing.
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=final.parent))
        try:
            import torch

            with torch.random.fork_rng(devices=[]):
                # Each type its own weights, so two types steer differently.
                torch.manual_seed(sum(control_type.encode()))
                self.build_tiny(self.tiny_base, tmp)
            tmp.chmod(0o755)
            try:
                os.rename(tmp, final)
            except OSError:  # another process built it first
                if not (final / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final


def randomize_zero_convolutions(controlnet: Any) -> None:
    """Make a tiny ControlNet steer: random weights where training would have put them.

    A ControlNet made from its base model starts with zero "zero convolutions", so it does
    nothing until trained; and at default initialisation the SDXL conditioning embedding (five
    convolutions with SiLU) shrinks the control image's signal to almost nothing, so two
    control images would give nearly the same picture. Tests need both to show.
    """
    import torch

    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if "cond_embedding" in name and name.endswith("weight"):
                # Gain 2 (above He's sqrt 2) keeps the image's signal alive through the stack.
                parameter.normal_(0.0, 2.0 / parameter[0].numel() ** 0.5)
            elif parameter.abs().sum() == 0:
                parameter.normal_(0.0, 0.5 if name.endswith("weight") else 0.1)
