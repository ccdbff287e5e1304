"""Pick CPU offload and batch size for a diffusers pipeline before loading it ("auto" settings).

The model's real size comes from its configs alone: every pipeline component listed in the
folder's ``model_index.json`` is instantiated from ``<component>/config.json`` on PyTorch's
``meta`` device (shapes, no storage, no weights read) and its parameters are counted, in the
dtype the component will run in. Activations per image come from the same configs through
the simple formulas below, each term commented with why it is there. They are estimates
meant to err on the large side, checked against peak memory of real-width blocks on a CPU.

Decision rule: no offload when the whole pipeline fits with room for the batch, model offload
when only the largest component fits, sequential offload below that; the largest batch that
fits (at most ``max_batch_size``, at least 1). The backend still halves the batch on an actual
out-of-memory error, so an estimate that is slightly off costs a retry, not a failed step.

This module deliberately does not import Dagster, and imports torch/diffusers/transformers
lazily inside functions, so importing it is cheap.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

GIB = 1024**3

Offload = Literal["none", "model", "sequential"]
OFFLOAD_MODES: tuple[Offload, ...] = ("none", "model", "sequential")  # least offload first
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# Components without weights: nothing to count, and no config.json to read.
_WEIGHTLESS_PREFIXES = ("scheduler", "tokenizer", "feature_extractor", "image_processor")

# Room the formulas do not see: the CUDA context and cuBLAS/cuDNN workspaces (a few hundred
# MiB), and the caching allocator's fragmentation, which grows with the size of the device.
RESERVE_MIN_BYTES = GIB // 2
RESERVE_FRACTION = 0.05

# FluxPipeline's default max_sequence_length: the T5 tokens the transformer attends to when
# the caller does not say (the project's FLUX settings use 256).
DEFAULT_T5_TOKENS = 512

# FLUX transformer, per token, in units of the hidden width D = heads * head_dim: what a
# single-stream block (the widest moment of the model) holds at once, counted in diffusers'
# FluxSingleTransformerBlock/FluxAttnProcessor:
#   1  the block's input, still referenced by the caller
#   1  its concatenation with the text tokens (also the residual)
#   1  the modulated LayerNorm output, used by both branches
#   4  the MLP branch after GELU (4x hidden), kept until the output projection
#   3  q, k, v
#   8  RoPE applied to q then k: it works in float32 (2 units per tensor) on the tensor, its
#      rotated copy and their products, and writes a new q/k
# = 18, rounded up to 20 for the attention output and the [attn, mlp] concat that replace
# the RoPE temporaries. Attention itself goes through SDPA (flash/memory-efficient kernels),
# so there is no seq x seq matrix. Measured on a CPU with real-width blocks: 170 MiB against
# 150 estimated at 512 px, 308 against 300 at 768 px (bf16), 273 against 300 in float32.
FLUX_LIVE_WIDTHS = 20

# SDXL UNet transformer blocks, per token, in units of the level's channels C: the block
# input and its normalised copy (2), the GEGLU projection to 8C (8), GELU of its gate half
# (4) and the product (4), plus the proj_in/proj_out reshapes around the block (2). The
# self-attention's q, k, v and output (4C) are freed before the feed-forward runs.
UNET_TRANSFORMER_WIDTHS = 20

# VAE decoder at full resolution: the widest tensors are the last upsampler's output and the
# first full-resolution ResNet's input, GroupNorm output and SiLU output (ops there are
# out of place), i.e. three live tensors of that width, plus one for the conv's cuDNN
# workspace and the upsampler's source. Measured on a CPU at 512 px: 1034 MiB (float32)
# and 560 MiB (bf16) against 1024 and 512 MiB from this term alone.
VAE_LIVE_TENSORS = 4

# Pipelines that run an fp16 VAE with force_upcast=True in float32 for the decode (SDXL's
# `needs_upcasting`); FluxPipeline ignores force_upcast.
_UPCASTING_PIPELINE_PREFIXES = ("StableDiffusionXL",)


@dataclass(frozen=True)
class ComponentSize:
    """Weights of one pipeline component, counted on the meta device."""

    name: str
    library: str
    class_name: str
    parameters: int
    weight_bytes: int  # all parameters, in the dtype the component runs in
    # The biggest single module's own parameters: what sequential offload (accelerate's
    # per-module hooks) holds on the device at once.
    largest_module_bytes: int
    bytes_per_element: int  # of its activations (4 for an upcast VAE)
    config: Mapping[str, Any]  # the full config, defaults filled in by the model class


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
# Weights, from the configs on the meta device
# --------------------------------------------------------------------------------------------


def _read_model_index(folder: Path) -> dict[str, Any]:
    """The folder's model_index.json; a clear error when it is not a diffusers pipeline."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no model_index.json: not a diffusers pipeline folder, so its memory "
            "needs cannot be estimated (set offload and batch_size explicitly)"
        )
    return json.loads(index_path.read_text(encoding="utf-8"))


def _import_class(library: str, class_name: str) -> type:
    """The class a model_index.json entry names (old indexes name a diffusers pipeline module)."""
    try:
        module = importlib.import_module(library)
    except ImportError:
        module = importlib.import_module(f"diffusers.pipelines.{library}")
    return getattr(module, class_name)


def _kept_in_fp32(cls: type, dtype: str, *, diffusers: bool) -> Callable[[str], bool]:
    """Whether the loader keeps a parameter (by full name) in float32 for ``dtype``."""
    if diffusers:
        # diffusers casts modules named in `_keep_in_fp32_modules` (whole dotted name parts)
        # to float32 whatever dtype was asked for.
        parts = frozenset(getattr(cls, "_keep_in_fp32_modules", None) or [])
        return lambda name: bool(parts.intersection(name.split(".")))
    # transformers keeps `_keep_in_fp32_modules` (e.g. T5's "wo") in float32 only for float16
    # loads, bf16 having float32's range, and `_keep_in_fp32_modules_strict` for fp16 and bf16;
    # the patterns are searched within the parameter's name.
    patterns: list[str] = []
    if dtype == "float16":
        patterns += list(getattr(cls, "_keep_in_fp32_modules", None) or [])
    if dtype in ("float16", "bfloat16"):
        patterns += list(getattr(cls, "_keep_in_fp32_modules_strict", None) or [])
    return lambda name: any(pattern in name for pattern in patterns)


def _measure_component(
    folder: Path, name: str, library: str, class_name: str, dtype: str, pipeline_class: str
) -> ComponentSize | None:
    """Instantiate one component on the meta device and count its parameters (None: no weights)."""
    import torch
    from diffusers import ModelMixin

    cls = _import_class(library, class_name)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        return None  # a scheduler, tokenizer or processor listed under an unusual name
    component_dir = folder / name
    if not (component_dir / "config.json").is_file():
        raise FileNotFoundError(f"{component_dir / 'config.json'} is missing ({class_name})")

    # On the meta device a 12B-parameter model costs shapes only: no memory, no weights read.
    with torch.device("meta"):
        if issubclass(cls, ModelMixin):  # diffusers
            model = cls.from_config(cls.load_config(component_dir))
            config = dict(model.config)
        else:  # transformers PreTrainedModel
            model = cls._from_config(cls.config_class.from_pretrained(component_dir))
            config = model.config.to_dict()

    element = DTYPE_BYTES[dtype]
    if (
        dtype == "float16"
        and config.get("force_upcast")
        and pipeline_class.startswith(_UPCASTING_PIPELINE_PREFIXES)
    ):
        # SDXL casts an fp16 VAE with force_upcast to float32 for the decode (fp16 overflows
        # there), so that is its size when it matters, and its activations are float32 too.
        element = 4
    kept_in_fp32 = _kept_in_fp32(cls, dtype, diffusers=issubclass(cls, ModelMixin))

    total_params = total_bytes = largest = 0
    seen: set[int] = set()  # tied weights (T5's shared embedding) are one tensor
    for module_name, module in model.named_modules():
        own = 0
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            size = 4 if kept_in_fp32(full_name) else element
            total_params += param.numel()
            own += param.numel() * size
        total_bytes += own
        largest = max(largest, own)
    return ComponentSize(
        name=name,
        library=library,
        class_name=class_name,
        parameters=total_params,
        weight_bytes=total_bytes,
        largest_module_bytes=largest,
        bytes_per_element=element,
        config=MappingProxyType(config),
    )


@functools.lru_cache(maxsize=32)
def _component_sizes(folder: str, dtype: str) -> tuple[ComponentSize, ...]:
    """Every weight-bearing component of the pipeline in ``folder`` (cached: FLUX takes ~1 s)."""
    path = Path(folder)
    index = _read_model_index(path)
    pipeline_class = str(index.get("_class_name", ""))
    sizes = []
    for name, spec in sorted(index.items()):
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2:
            continue  # metadata and pipeline options such as force_zeros_for_empty_prompt
        library, class_name = spec
        if library is None or class_name is None or name.startswith(_WEIGHTLESS_PREFIXES):
            continue  # optional components listed as absent, and weightless ones
        size = _measure_component(path, name, library, class_name, dtype, pipeline_class)
        if size is not None:
            sizes.append(size)
    return tuple(sizes)


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, not {dtype!r}")


def _sizes(model_dir: str | Path, dtype: str) -> tuple[ComponentSize, ...]:
    _check_dtype(dtype)
    return _component_sizes(str(Path(model_dir).expanduser().resolve()), dtype)


def component_weight_bytes(model_dir: str | Path, dtype: str) -> dict[str, int]:
    """Weight bytes per pipeline component, in the dtype each runs in, counted without weights."""
    return {size.name: size.weight_bytes for size in _sizes(model_dir, dtype)}


# --------------------------------------------------------------------------------------------
# Activations per image, from the configs
# --------------------------------------------------------------------------------------------


def _vae_scale_factor(sizes: tuple[ComponentSize, ...]) -> int:
    """Pixels per latent cell: 2 ** (VAE levels - 1), as the pipelines compute it (8 here)."""
    for size in sizes:
        if "block_out_channels" in size.config and size.class_name.startswith("Autoencoder"):
            return 2 ** (len(size.config["block_out_channels"]) - 1)
    return 8


def _flux_activation_bytes(
    config: Mapping[str, Any], *, width: int, height: int, text_tokens: int, scale: int, bpe: int
) -> int:
    """FluxTransformer2DModel, one image: (image + text tokens) x hidden x live widths."""
    # Latents are H/8 x W/8 and the pipeline packs 2x2 of them per token: one token per
    # 16x16 pixels. The text tokens (T5) join the same sequence in every block.
    image_tokens = math.ceil(height / (2 * scale)) * math.ceil(width / (2 * scale))
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    return (image_tokens + text_tokens) * hidden * FLUX_LIVE_WIDTHS * bpe


def _unet_activation_bytes(
    config: Mapping[str, Any], *, width: int, height: int, scale: int, bpe: int
) -> int:
    """UNet2DConditionModel, one image: the widest moment of any level, plus the skip tensors."""
    channels = list(config["block_out_channels"])
    levels = len(channels)
    latent_h, latent_w = math.ceil(height / scale), math.ceil(width / scale)
    # Each level halves the latent's side: a quarter of the tokens of the level above.
    tokens = [math.ceil(latent_h / 2**i) * math.ceil(latent_w / 2**i) for i in range(levels)]
    attention = ["CrossAttn" in block for block in config["down_block_types"]]
    # The mid block sits at the lowest resolution and has attention in SDXL.
    attention[-1] = attention[-1] or "CrossAttn" in str(config.get("mid_block_type") or "")
    layers = config["layers_per_block"]
    layers = list(layers) if isinstance(layers, list | tuple) else [layers] * levels

    widest = 0
    for i, width_c in enumerate(channels):
        # Up-path ResNets take the upsampled level below concatenated with this level's skip
        # (e.g. 1280 + 640 at SDXL's middle level): that input, its GroupNorm and SiLU
        # outputs are live together, plus the conv's output at the level's width.
        concat = channels[min(i + 1, levels - 1)] + width_c
        widest = max(widest, tokens[i] * (3 * concat + width_c))
        if attention[i]:
            widest = max(widest, tokens[i] * width_c * UNET_TRANSFORMER_WIDTHS)

    # The down path's outputs (conv_in, each ResNet/transformer pair, each downsampler) are
    # kept for the up path's skip connections for the whole forward.
    skips = tokens[0] * channels[0]
    for i, width_c in enumerate(channels):
        skips += layers[i] * width_c * tokens[i]
        if i < levels - 1:
            skips += width_c * tokens[i + 1]
    return (widest + skips) * bpe


def _vae_decode_activation_bytes(
    config: Mapping[str, Any], *, width: int, height: int, scale: int, bpe: int
) -> int:
    """AutoencoderKL decode of one image at full resolution."""
    channels = list(config["block_out_channels"])
    # The decoder reverses block_out_channels: the last upsampler brings the second level's
    # width (256 of 128/256/512/512) up to full resolution, ahead of the last level (128).
    full_res_channels = max(channels[:2])
    feature_maps = height * width * full_res_channels * VAE_LIVE_TENSORS
    # The mid block's single-head attention over every latent cell has a head 512 wide; flash
    # attention stops at 256, and where the memory-efficient kernel cannot take it either,
    # SDPA's math fallback materialises the scores and their softmax (2 x cells^2).
    attention = 0
    if config.get("mid_block_add_attention", True):
        cells = math.ceil(height / scale) * math.ceil(width / scale)
        attention = 2 * cells * cells
    return (feature_maps + attention) * bpe


def _text_encoder_activation_bytes(config: Mapping[str, Any], *, tokens: int, bpe: int) -> int:
    """A CLIP or T5 text encoder, one prompt: per-token tensors plus the attention scores."""
    hidden = config.get("hidden_size") or config["d_model"]
    ff = config.get("intermediate_size") or config["d_ff"]
    heads = config.get("num_attention_heads") or config["num_heads"]
    layers = config.get("num_hidden_layers") or config["num_layers"]
    # Residual, normed input, attention output (3) and q, k, v (3); the MLP's pre- and
    # post-activation (2 x ff), or for a gated MLP (T5 v1.1) both input projections and
    # their product (3 x ff); and every layer's hidden states, which SDXL requests to take
    # the penultimate one (layers + 1).
    mlp = 3 * ff if config.get("is_gated_act") else 2 * ff
    per_token = 6 * hidden + mlp + (layers + 1) * hidden
    # T5's relative position bias rules out fused attention, and softmax runs in float32:
    # scores and probabilities materialised per head.
    scores = 2 * heads * tokens * tokens * 4
    return tokens * per_token * bpe + scores


def _activation_bytes(
    sizes: tuple[ComponentSize, ...], *, width: int, height: int, text_tokens: int | None
) -> dict[str, int]:
    """Activation bytes per image for each component."""
    scale = _vae_scale_factor(sizes)
    result: dict[str, int] = {}
    for size in sizes:
        config, bpe = size.config, size.bytes_per_element
        if size.class_name == "FluxTransformer2DModel":
            tokens = text_tokens if text_tokens is not None else DEFAULT_T5_TOKENS
            result[size.name] = _flux_activation_bytes(
                config, width=width, height=height, text_tokens=tokens, scale=scale, bpe=bpe
            )
        elif size.class_name == "UNet2DConditionModel":
            result[size.name] = _unet_activation_bytes(
                config, width=width, height=height, scale=scale, bpe=bpe
            )
        elif size.class_name == "AutoencoderKL":
            result[size.name] = _vae_decode_activation_bytes(
                config, width=width, height=height, scale=scale, bpe=bpe
            )
        elif size.library == "transformers" and ("hidden_size" in config or "d_model" in config):
            # CLIP tokenizers pad to the absolute position table (77); T5 has relative
            # positions and reads the pipeline's max_sequence_length.
            tokens = config.get("max_position_embeddings") or (
                text_tokens if text_tokens is not None else DEFAULT_T5_TOKENS
            )
            result[size.name] = _text_encoder_activation_bytes(config, tokens=tokens, bpe=bpe)
        else:
            raise ValueError(
                f"no activation estimate for component {size.name!r} ({size.class_name}); "
                "set offload and batch_size explicitly for this model"
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
) -> MemoryPlan:
    """Choose offload and batch size for the pipeline in ``model_dir`` given ``free_bytes``.

    ``offload`` or ``batch_size`` given explicitly (not "auto"/None) is kept and only the other
    is chosen; ``text_tokens`` is FLUX's max_sequence_length (None: the pipeline's 512).
    """
    if offload != "auto" and offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be 'auto' or one of {OFFLOAD_MODES}, not {offload!r}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, not {max_batch_size}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, not {width}x{height}")

    sizes = _sizes(model_dir, dtype)
    if not sizes:
        raise ValueError(f"{model_dir} lists no component with weights in model_index.json")
    activations = _activation_bytes(sizes, width=width, height=height, text_tokens=text_tokens)
    vae_names = frozenset(s.name for s in sizes if s.class_name.startswith("Autoencoder"))
    estimate = _Estimate(
        weights={s.name: s.weight_bytes for s in sizes},
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
