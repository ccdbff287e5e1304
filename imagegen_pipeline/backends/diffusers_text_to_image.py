"""What the local diffusers backends share: loading, memory fitting, batching, out-of-memory.

Subclasses name their pipeline class and spec (name, precision, variant, memory hooks) and say
how one batch is called; this module does the rest the same way for all of them. Torch and
diffusers are imported when the model loads or runs, so declaring a backend costs nothing.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from PIL import Image

from imagegen_pipeline.backends.adapters import AdapterSwitcher
from imagegen_pipeline.backends.base import ImageBackend, ImageRequest, ImageResult, RunSummary
from imagegen_pipeline.backends.compilation import CompileWatch
from imagegen_pipeline.backends.controlnets import ControlNets, TinyControlNetBuilder
from imagegen_pipeline.control import control_map
from imagegen_pipeline.memory_fit import MemoryPlan, free_memory_bytes, plan_memory
from imagegen_pipeline.model_settings import DiffusersImageSettings, GenerationSettings, ImageTarget
from imagegen_pipeline.records import utc_now
from imagegen_pipeline.tiny_models import is_tiny_model
from imagegen_pipeline.torch_runtime import (
    DiffusersModel,
    PeakMemory,
    dtype_name,
    free_accelerator_memory,
    is_out_of_memory,
    local_model_folder,
    resolve_device,
    resolve_dtype,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


# What adds up over the generate calls of one step (see RunSummary.totals).
STEP_TOTALS = frozenset(
    {
        "adapter_loads",
        "adapter_switches",
        "adapter_load_seconds",
        "adapter_switch_seconds",
        "controlnet_loads",
        "controlnet_load_seconds",
        "compile_seconds",
        "recompiles",
    }
)


class DiffusersTextToImage(DiffusersModel, ImageBackend):
    """A text-to-image diffusers pipeline, loaded once and called once per batch."""

    pipeline_class_name: ClassVar[str]  # a diffusers pipeline class, imported at load time
    # Its ControlNet pipeline and model classes, and how to build a tiny ControlNet for tests.
    # None: the backend takes no ControlNet (its control rows fail saying so).
    controlnet_pipeline_class_name: ClassVar[str | None] = None
    controlnet_model_class_name: ClassVar[str | None] = None
    build_tiny_controlnet: ClassVar[TinyControlNetBuilder | None] = None

    def __init__(self, settings: DiffusersImageSettings, model_id: str | None = None) -> None:
        self.config = settings
        self.model_id = model_id or settings.model  # what content addresses record
        self.target  # noqa: B018 - raises for settings that were not resolved
        self._device = resolve_device(settings.device)
        self._dtype = resolve_dtype(settings.dtype, self.spec.dtype, self._device)
        self.memory_plan: MemoryPlan | None = None
        self.room_for_others = 0  # device bytes kept free for another model of the step
        self.batch_size = settings.batch_size or 1
        self.offload = "none" if settings.offload == "auto" else settings.offload
        self.adapters: AdapterSwitcher | None = None  # created with the pipeline
        self.controlnets: ControlNets | None = None  # created with the pipeline
        self.compile_watch = CompileWatch(settings.compile, settings.compile_backend)

    @property
    def target(self) -> ImageTarget:
        return self.config.image_target(self.name, self.model_id)

    @property
    def settings(self) -> GenerationSettings:
        return self.target.settings

    @property
    def default_size(self) -> tuple[int, int]:
        return self.target.default_size

    @property
    def supports_negative_prompt(self) -> bool:  # type: ignore[override]
        return self.target.supports_negative_prompt

    @property
    def device(self) -> str:
        return str(self._device)

    @property
    def dtype(self) -> torch.dtype:
        """The precision the pipeline runs in."""
        return self._dtype

    def plan_memory(
        self, adapter_bytes: dict[str, int] | None = None, offload: str | None = None
    ) -> MemoryPlan | None:
        """Offload and batch size for the free memory of the device (None when both are set);
        ``adapter_bytes``: LoRA weights on each component; ``offload``: keep this mode."""
        config = self.config
        if config.offload != "auto" and config.batch_size is not None:
            return None
        if self.spec.memory is None:  # an architecture without estimates: set by hand
            return None
        folder = local_model_folder(config.model, config.revision)
        if folder is None:  # no weights here: loading fails next, with the clear message
            return None
        width, height = self.default_size
        try:
            hooks = self.spec.memory
            tokens_setting = hooks.text_tokens_setting
            tokens = getattr(config, tokens_setting) if tokens_setting else None
            return plan_memory(
                folder,
                hooks,
                text_tokens=tokens,
                dtype=dtype_name(self._dtype),
                free_bytes=max(0, free_memory_bytes(str(self._device)) - self.room_for_others),
                width=width,
                height=height,
                max_batch_size=config.max_batch_size,
                vae_slicing=config.vae_slicing,
                offload=offload or config.offload,
                batch_size=config.batch_size,
                adapter_bytes=adapter_bytes,
            )
        except ValueError as error:  # a layout the estimates do not know: run unoffloaded
            logger.warning("%s: no memory plan (%s); offload none, batch 1.", self.name, error)
            return None

    def fit_adapters(self, requests: Sequence[ImageRequest]) -> None:
        """Re-plan the batch size for the LoRA and ControlNet weights ``requests`` load and the
        room left for another model (offload is kept: the model is placed already). Only when
        the batch size is the planner's."""
        if self.memory_plan is None or self.config.batch_size is not None:
            return
        import torch

        per_element = torch.finfo(self._dtype).bits // 8
        extra = self.adapters.planned_bytes((r.loras for r in requests), per_element)
        # A ControlNet runs beside the denoiser (offload moves them together): its weights
        # count with the denoiser's.
        control_types = {r.control.type for r in requests if r.control is not None}
        try:
            nets = self.controlnets
            controlnet = nets.planned_elements(control_types) * per_element if nets else 0
        except ValueError:  # a type without a ControlNet: its images fail with the reason
            controlnet = 0
        if controlnet:
            denoiser = self.spec.lora_components[0]  # "unet" or "transformer"
            extra = {**extra, denoiser: extra.get(denoiser, 0) + controlnet}
        replan = extra or self.room_for_others
        plan = self.plan_memory(adapter_bytes=extra, offload=self.offload) if replan else None
        if plan is not None:
            self.memory_plan = plan
            self.batch_size = min(self.batch_size, plan.batch_size)

    def leave_room(self, other_bytes: int) -> None:
        """Plan with ``other_bytes`` less free memory: the offload when it loads, the batch size
        at each generate call after."""
        self.room_for_others = other_bytes

    def load(self) -> float:
        if self.pipeline is not None:
            return 0.0
        import diffusers

        started = time.perf_counter()
        self.memory_plan = self.plan_memory()
        planned = self.memory_plan.offload if self.memory_plan else self.config.offload
        offload = "none" if planned == "auto" else planned
        self.batch_size = self.memory_plan.batch_size if self.memory_plan else self.batch_size
        if self.memory_plan:
            logger.info("%s memory plan: %s", self.name, self.memory_plan.reason)
        pipeline = self.load_pipeline(
            getattr(diffusers, self.pipeline_class_name),
            self.config,
            dtype=self._dtype,
            variant=self.spec.variant,
            offload=offload,
            device=self._device,
        )
        # Decode a batch one image at a time / in tiles: less peak memory at a small cost.
        if self.config.vae_slicing:
            pipeline.vae.enable_slicing()
        if self.config.vae_tiling:
            pipeline.vae.enable_tiling()
        self.pipeline = pipeline
        # Compiled: LoRAs hotswap into fixed slots, so a switch keeps the compiled graph.
        compiled = self.config.compile != "off"
        self.adapters = AdapterSwitcher(
            pipeline, hotswap=compiled, hotswap_rank=self.config.hotswap_rank
        )
        self.compile_watch.apply(pipeline)
        self.offload = offload
        folder = local_model_folder(self.config.model, self.config.revision)
        tiny = folder is not None and is_tiny_model(folder)
        if self.controlnet_pipeline_class_name is None or self.controlnet_model_class_name is None:
            return time.perf_counter() - started
        self.controlnets = ControlNets(
            pipeline,
            self.name,
            self.controlnet_pipeline_class_name,
            self.controlnet_model_class_name,
            # The backend's defaults, with the configured types replacing theirs.
            {**self.spec.controlnets, **(self.config.controlnets or {})},
            dtype=self._dtype,
            device=self._device,
            offload=offload,
            allow_download=self.config.allow_download,
            tiny_base=folder if tiny else None,
            build_tiny=type(self).build_tiny_controlnet,
        )
        return time.perf_counter() - started

    def unload(self) -> None:
        self.controlnets = None
        super().unload()

    def weight_bytes(self) -> int:
        controlnets = self.controlnets.weight_bytes() if self.controlnets else 0
        return super().weight_bytes() + controlnets

    def run_summary(self) -> RunSummary:
        plan = self.memory_plan
        return RunSummary(
            metadata={
                "offload": self.offload,
                "batch_size": self.batch_size,
                "memory_plan": plan.reason if plan else "offload and batch size set by hand",
                "adapter_loads": self.adapters.loads if self.adapters else 0,
                "adapter_switches": self.adapters.switches if self.adapters else 0,
                "adapter_load_seconds": self.adapters.load_seconds if self.adapters else 0.0,
                "adapter_switch_seconds": self.adapters.switch_seconds if self.adapters else 0.0,
                "controlnet_loads": self.controlnets.loads if self.controlnets else 0,
                "controlnet_load_seconds": (
                    self.controlnets.load_seconds if self.controlnets else 0.0
                ),
                **self.compile_watch.summary(),
            },
            totals=STEP_TOTALS,
        )

    def pipeline_kwargs(self, batch: Sequence[ImageRequest]) -> dict[str, Any]:
        """Backend-specific arguments of one pipeline call (the prompts are added here)."""
        return {}

    def _negative_prompts(self, batch: Sequence[ImageRequest]) -> dict[str, Any]:
        # Only where the backend's target says it reads them (guidance > 1): the content
        # address records an empty negative prompt otherwise.
        if not self.supports_negative_prompt:
            return {}
        return {"negative_prompt": [request.negative_prompt for request in batch]}

    def generate(self, requests: Sequence[ImageRequest]) -> Iterator[ImageResult]:
        """Batches of up to ``batch_size`` requests of one size and adapter set, one pipeline
        call per batch, results grouped by adapter set (no adapters first), then request order.

        Out of memory halves the batch and retries, down to one image; any other failure of a
        batch retries its images one by one, so one bad prompt fails alone.
        """
        self.load()
        # The run summary reports this call's loads and switches.
        self.adapters.reset_counts()
        if self.controlnets is not None:
            self.controlnets.reset_counts()
        self.compile_watch.reset_counts()
        # Adapters stay loaded after a call: a step calls again with the same ones (its
        # replacements, then each best-of-N round), and reading a file again costs what a
        # switch saves. What this call does not use is freed before the memory plan.
        self.adapters.release(still_needed=(a.adapter_name for r in requests for a in r.loras))
        self.adapters.prepare(request.loras for request in requests)  # hotswap slots, if any
        self.fit_adapters(requests)
        # One group per adapter set, ControlNet and size: the base model stays loaded and the
        # adapters switch between groups.
        groups: dict[tuple[Any, ...], list[ImageRequest]] = {}
        for request in requests:
            adapters = tuple((a.adapter_name, a.scale) for a in request.loras)
            control = (request.control.type, request.control.scale) if request.control else ()
            key = (adapters, control, request.width, request.height)
            groups.setdefault(key, []).append(request)
        order = sorted(groups, key=lambda key: (len(key[0]), key[0], key[1]))
        for key in order:
            same_group = groups[key]
            self.adapters.activate(same_group[0].loras)
            yield from self._generate_group(same_group)

    def _generate_group(self, same_size: list[ImageRequest]) -> Iterator[ImageResult]:
        """The requests of one adapter set and size, batched (see ``generate``)."""
        pending = deque(self._batches(same_size))
        while pending:
            batch = pending.popleft()
            if len(batch) > self.batch_size:  # planned before an out-of-memory halving
                pending.extendleft(reversed(self._batches(batch)))
                continue
            started_at = utc_now()
            try:
                images, maps, seconds, peak_mb = self._call(batch)
            except Exception as exc:
                if len(batch) > 1:
                    if is_out_of_memory(exc):
                        free_accelerator_memory()
                        self.batch_size = max(1, len(batch) // 2)
                        logger.warning(
                            "Out of memory at batch %d; retrying at %d.",
                            len(batch),
                            self.batch_size,
                        )
                        halves = [batch[: self.batch_size], batch[self.batch_size :]]
                    else:
                        halves = [[request] for request in batch]
                    pending.extendleft(reversed(halves))
                    continue
                if is_out_of_memory(exc):
                    free_accelerator_memory()
                yield ImageResult(batch[0], "failed", error=f"{type(exc).__name__}: {exc}")
                continue
            for request, image, control in zip(batch, images, maps, strict=True):
                yield ImageResult(
                    request,
                    "ok",
                    image=image,
                    seconds=seconds / len(batch),
                    details={
                        "peak_gpu_memory_mb": peak_mb,
                        "batch_size": len(batch),
                        "started_at": started_at,
                        "control_map": control,
                    },
                )

    def _batches(self, requests: Sequence[ImageRequest]) -> list[list[ImageRequest]]:
        size = self.batch_size
        return [list(requests[i : i + size]) for i in range(0, len(requests), size)]

    def control_kwargs(self, maps: list[Image.Image], scale: float) -> dict[str, Any]:
        """The ControlNet pipeline's arguments for one batch's control maps."""
        return {"image": maps, "controlnet_conditioning_scale": scale}

    def _call(
        self, batch: Sequence[ImageRequest]
    ) -> tuple[list[Image.Image], list[Image.Image | None], float, float | None]:
        """One pipeline call: the images, each one's control map (None without), the seconds
        and the peak memory."""
        import torch

        # One CPU generator per image: each image's initial noise depends on its own seed
        # alone, so any image can be regenerated by itself, on any device, in any batch.
        generators = [torch.Generator("cpu").manual_seed(request.seed) for request in batch]
        control = batch[0].control  # one type and scale per batch (see ``generate``)
        pipeline, maps, control_kwargs = self.pipeline, [None] * len(batch), {}
        if control is not None:
            width, height = batch[0].width, batch[0].height
            if self.controlnets is None:
                raise ValueError(f"{self.name} takes no ControlNet: leave control_image empty")
            pipeline = self.controlnets.pipeline_for(control.type)
            maps = [control_map(request.control, width, height) for request in batch]
            control_kwargs = self.control_kwargs(maps, control.scale)
        started = time.perf_counter()
        with PeakMemory(self._device) as peak, torch.inference_mode():
            output = pipeline(
                prompt=[request.prompt for request in batch],
                generator=generators,
                num_inference_steps=self.config.steps,
                guidance_scale=self.config.guidance,
                width=batch[0].width,
                height=batch[0].height,
                output_type="pil",
                **self._negative_prompts(batch),
                **self.pipeline_kwargs(batch),
                **control_kwargs,
            )
        self.compile_watch.after_call()
        return list(output.images), maps, time.perf_counter() - started, peak.mib
