"""Pick CPU offload and batch size for a diffusers pipeline before loading it ("auto" settings).

The model's real size comes from its configs alone (``component_sizes``: parameters counted on
PyTorch's ``meta`` device). Activations per image come from the same configs through the
estimates each model names in its spec (``ModelSpec.memory``, formulas in
``memory_estimates``), so a new architecture brings its own estimate and nothing here changes.

Decision rule: no offload when the whole pipeline fits with room for the batch, model offload
when only the largest component fits, sequential offload below that; the largest batch that
fits (at most ``max_batch_size``, at least 1). The backend still halves the batch on an actual
out-of-memory error, so an estimate that is slightly off costs a retry, not a failed step.

This module deliberately does not import Dagster, and imports torch/diffusers/transformers
lazily inside functions, so importing it is cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from imagegen_pipeline.component_sizes import ComponentSize, component_sizes
from imagegen_pipeline.model_spec import MemoryHooks

GIB = 1024**3

Offload = Literal["none", "model", "sequential"]
OFFLOAD_MODES: tuple[Offload, ...] = ("none", "model", "sequential")  # least offload first

# Room the formulas do not see: the CUDA context and cuBLAS/cuDNN workspaces (a few hundred
# MiB), and the caching allocator's fragmentation, which grows with the size of the device.
RESERVE_MIN_BYTES = GIB // 2
RESERVE_FRACTION = 0.05


@dataclass(frozen=True)
class MemoryPlan:
    """The offload mode and batch size chosen for a pipeline, and why."""

    offload: Offload
    batch_size: int
    reason: str  # one human sentence
    free_bytes: int
    weights_bytes: dict[str, int]  # per component, in the dtype it runs in
    # What grows with the batch: denoiser + text encoders + (VAE unless slicing).
    activation_bytes_per_image: int
    activation_bytes: dict[str, int]  # per component, per image (VAE: per decoded image)
    reserve_bytes: int
    peak_bytes: int  # estimated peak of the chosen offload mode and batch
    fits: bool  # False when even the chosen plan is expected to run out of memory

    @property
    def usable_bytes(self) -> int:
        """Free memory minus the reserve: what the estimates may fill."""
        return self.free_bytes - self.reserve_bytes

    def as_metadata(self) -> dict[str, Any]:
        """Flat, JSON-serialisable fields (prefixed ``memory_``) for step metadata."""
        metadata: dict[str, Any] = {
            "memory_offload": self.offload,
            "memory_batch_size": self.batch_size,
            "memory_reason": self.reason,
            "memory_fits": self.fits,
            "memory_free_bytes": self.free_bytes,
            "memory_reserve_bytes": self.reserve_bytes,
            "memory_peak_bytes": self.peak_bytes,
            "memory_activation_bytes_per_image": self.activation_bytes_per_image,
        }
        for name, size in sorted(self.weights_bytes.items()):
            metadata[f"memory_weights_bytes_{name}"] = size
        for name, size in sorted(self.activation_bytes.items()):
            metadata[f"memory_activation_bytes_{name}"] = size
        return metadata


# --------------------------------------------------------------------------------------------
# Activations per image, from the configs
# --------------------------------------------------------------------------------------------


def _vae_scale_factor(sizes: tuple[ComponentSize, ...]) -> int:
    """Pixels per latent cell: 2 ** (VAE levels - 1), as the pipelines compute it (8 here)."""
    for size in sizes:
        if "block_out_channels" in size.config and size.class_name.startswith("Autoencoder"):
            return 2 ** (len(size.config["block_out_channels"]) - 1)
    return 8


def _activation_bytes(
    sizes: tuple[ComponentSize, ...],
    memory: MemoryHooks,
    *,
    width: int,
    height: int,
    text_tokens: int | None,
) -> dict[str, int]:
    """Activation bytes per image for each component, from the model's own estimates."""
    scale = _vae_scale_factor(sizes)
    result: dict[str, int] = {}
    for size in sizes:
        estimate = memory.activations.get(size.name)
        if estimate is None:
            raise ValueError(
                f"no activation estimate for component {size.name!r} ({size.class_name}); "
                "set offload and batch_size explicitly for this model"
            )
        result[size.name] = estimate(
            size.config,
            width=width,
            height=height,
            text_tokens=text_tokens,
            scale=scale,
            bpe=size.bytes_per_element,
        )
    return result


# --------------------------------------------------------------------------------------------
# The decision
# --------------------------------------------------------------------------------------------


def _gib(size: int) -> str:
    value = size / GIB
    return f"{value:.2f} GiB" if abs(value) < 10 else f"{value:.1f} GiB"


@dataclass(frozen=True)
class _Estimate:
    """Peak memory of each offload mode as a function of the batch size."""

    weights: dict[str, int]
    largest_module: dict[str, int]
    activations: dict[str, int]
    vae_names: frozenset[str]
    vae_slicing: bool

    def _images(self, name: str, batch: int) -> int:
        # With slicing the VAE decodes one image at a time: its share does not grow.
        return 1 if self.vae_slicing and name in self.vae_names else batch

    def component_peaks(self, offload: Offload, batch: int) -> dict[str, int]:
        """Per component: what is on the device while it runs (offload modes only)."""
        resident = self.weights if offload == "model" else self.largest_module
        return {
            name: resident[name] + self.activations[name] * self._images(name, batch)
            for name in self.weights
        }

    def peak(self, offload: Offload, batch: int) -> int:
        """Estimated peak device memory of ``offload`` with ``batch`` images per call."""
        if offload == "none":
            # Everything stays resident. The components' activations are added rather than
            # maxed: the caching allocator may not reuse the denoiser's freed blocks for the
            # VAE's differently shaped ones, so the sum is the safe side.
            activations = sum(
                self.activations[name] * self._images(name, batch) for name in self.weights
            )
            return sum(self.weights.values()) + activations
        # Model offload: one whole component on the device at a time; sequential: one module.
        return max(self.component_peaks(offload, batch).values())

    def largest_batch(self, offload: Offload, usable: int, cap: int) -> int:
        """The largest batch in 1..cap whose peak fits in ``usable`` (0 when none does)."""
        # Peaks grow linearly with the batch, so counting down from the cap is exact; caps
        # are small (8 by default).
        for batch in range(cap, 0, -1):
            if self.peak(offload, batch) <= usable:
                return batch
        return 0

    def limiter(self, offload: Offload, batch: int) -> str:
        """Which component stops the batch from growing past ``batch`` (offload modes)."""
        peaks = self.component_peaks(offload, batch + 1)
        return max(peaks, key=peaks.__getitem__)


def reserve_bytes(free_bytes: int) -> int:
    """Memory kept out of the estimates: max(0.5 GiB, 5% of free)."""
    return max(RESERVE_MIN_BYTES, int(free_bytes * RESERVE_FRACTION))


def plan_memory(
    model_dir: str | Path,
    memory: MemoryHooks,
    *,
    dtype: str,
    free_bytes: int,
    width: int,
    height: int,
    max_batch_size: int = 8,
    vae_slicing: bool = False,
    text_tokens: int | None = None,
    offload: str = "auto",
    batch_size: int | None = None,
    adapter_bytes: Mapping[str, int] | None = None,
) -> MemoryPlan:
    """Choose offload and batch size for the pipeline in ``model_dir`` given ``free_bytes``.

    ``offload`` or ``batch_size`` given explicitly (not "auto"/None) is kept and only the other
    is chosen; ``text_tokens`` is FLUX's max_sequence_length (None: the pipeline's 512);
    ``adapter_bytes``: weights added to a component after loading, which live and move with
    it: its LoRA adapters, and for the denoiser the ControlNet that runs beside it.
    """
    if offload != "auto" and offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be 'auto' or one of {OFFLOAD_MODES}, not {offload!r}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, not {max_batch_size}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, not {width}x{height}")

    sizes = component_sizes(model_dir, dtype, memory.upcast_vae)
    if not sizes:
        raise ValueError(f"{model_dir} lists no component with weights in model_index.json")
    activations = _activation_bytes(
        sizes, memory, width=width, height=height, text_tokens=text_tokens
    )
    vae_names = frozenset(s.name for s in sizes if s.class_name.startswith("Autoencoder"))
    adapters = adapter_bytes or {}
    estimate = _Estimate(
        weights={s.name: s.weight_bytes + adapters.get(s.name, 0) for s in sizes},
        largest_module={s.name: s.largest_module_bytes for s in sizes},
        activations=activations,
        vae_names=vae_names,
        vae_slicing=vae_slicing,
    )
    reserve = reserve_bytes(free_bytes)
    usable = free_bytes - reserve
    total = sum(estimate.weights.values())
    largest_name = max(estimate.weights, key=estimate.weights.__getitem__)
    per_image = sum(
        size for name, size in activations.items() if not (vae_slicing and name in vae_names)
    )
    budget = f"{_gib(usable)} usable ({_gib(free_bytes)} free - {_gib(reserve)} reserve)"
    if sum(adapters.values()):
        budget += f", LoRA adapters and ControlNets {_gib(sum(adapters.values()))} included"

    def batch_note(mode: Offload, batch: int) -> str:
        if batch >= max_batch_size:
            return f"capped at max_batch_size {max_batch_size}"
        if mode == "none":
            return "the largest that fits"
        return f"the largest that fits, limited by {estimate.limiter(mode, batch)}"

    chosen: Offload
    if offload == "auto" and batch_size is None:
        if estimate.peak("none", 1) <= usable:
            chosen = "none"
            batch = estimate.largest_batch("none", usable, max_batch_size)
            reason = (
                f"whole pipeline {_gib(total)} fits in {budget} with batch {batch} at "
                f"{_gib(per_image)} per image ({batch_note('none', batch)}): no offload"
            )
        elif estimate.peak("model", 1) <= usable:
            chosen = "model"
            batch = estimate.largest_batch("model", usable, max_batch_size)
            reason = (
                f"whole pipeline {_gib(total)} plus one image does not fit in {budget}, but "
                f"the largest component, {largest_name} {_gib(estimate.weights[largest_name])}, "
                f"does with its activations: model offload, batch {batch} "
                f"({batch_note('model', batch)})"
            )
        else:
            chosen = "sequential"
            batch = estimate.largest_batch("sequential", usable, max_batch_size)
            head = (
                f"not even the largest component, {largest_name} "
                f"{_gib(estimate.weights[largest_name])}, fits with one image in {budget}"
            )
            if batch:
                reason = (
                    f"{head}: sequential offload, batch {batch} ({batch_note('sequential', batch)})"
                )
            else:
                batch = 1
                reason = (
                    f"{head}, and even sequential offload with batch 1 needs about "
                    f"{_gib(estimate.peak('sequential', 1))}: sequential offload, batch 1, "
                    "expect out-of-memory"
                )
    elif batch_size is None:
        chosen = offload  # type: ignore[assignment]
        batch = estimate.largest_batch(chosen, usable, max_batch_size)
        if batch:
            reason = (
                f"offload {chosen!r} was set: batch {batch} ({batch_note(chosen, batch)}) "
                f"peaks at {_gib(estimate.peak(chosen, batch))} in {budget}"
            )
        else:
            batch = 1
            reason = (
                f"offload {chosen!r} was set, but even batch 1 needs about "
                f"{_gib(estimate.peak(chosen, 1))} against {budget}: batch 1, "
                "expect out-of-memory"
            )
    elif offload == "auto":
        batch = batch_size
        fitting = [mode for mode in OFFLOAD_MODES if estimate.peak(mode, batch) <= usable]
        if fitting:
            chosen = fitting[0]
            reason = (
                f"batch {batch} was set: {chosen!r} is the least offload that fits it "
                f"(peak {_gib(estimate.peak(chosen, batch))} in {budget})"
            )
        else:
            chosen = "sequential"
            reason = (
                f"batch {batch} was set, but even sequential offload needs about "
                f"{_gib(estimate.peak(chosen, batch))} against {budget}: sequential offload, "
                "expect out-of-memory"
            )
    else:
        chosen, batch = offload, batch_size  # type: ignore[assignment]
        verdict = "fits" if estimate.peak(chosen, batch) <= usable else "does not fit"
        reason = (
            f"offload {chosen!r} and batch {batch} were set: estimated peak "
            f"{_gib(estimate.peak(chosen, batch))} {verdict} in {budget}"
        )

    peak = estimate.peak(chosen, batch)
    return MemoryPlan(
        offload=chosen,
        batch_size=batch,
        reason=reason,
        free_bytes=free_bytes,
        weights_bytes=dict(estimate.weights),
        activation_bytes_per_image=per_image,
        activation_bytes=dict(activations),
        reserve_bytes=reserve,
        peak_bytes=peak,
        fits=peak <= usable,
    )


def fits_beside(plan: MemoryPlan, other_bytes: int) -> tuple[bool, str]:
    """Whether another model of ``other_bytes`` (a scorer's weights) fits on the device beside
    the pipeline as ``plan`` places it, with the sentence saying why."""
    room = plan.usable_bytes - plan.peak_bytes
    verdict = "fits" if other_bytes <= room else "does not fit"
    reason = (
        f"{_gib(other_bytes)} {verdict} beside the generator's planned peak "
        f"{_gib(plan.peak_bytes)} in {_gib(plan.usable_bytes)} usable"
    )
    return other_bytes <= room, reason


def free_memory_bytes(device: str) -> int:
    """Free memory of ``device``: CUDA's free bytes, else the host's available RAM."""
    if device == "auto" or device.startswith("cuda"):
        import torch

        if device.startswith("cuda") or torch.cuda.is_available():
            target = torch.device("cuda" if device == "auto" else device)
            # mem_get_info wants an index or None (the current device), not a bare "cuda".
            return int(torch.cuda.mem_get_info(target.index)[0])
    import psutil

    return int(psutil.virtual_memory().available)
