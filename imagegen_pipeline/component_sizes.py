"""The size of a diffusers pipeline's weights, counted from its configs without reading them.

Every pipeline component listed in the folder's ``model_index.json`` is instantiated from
``<component>/config.json`` on PyTorch's ``meta`` device (shapes, no storage, no weights read)
and its parameters are counted in the dtype the component will run in, with the exceptions the
loaders make (modules kept in float32, an upcast VAE). ``memory_fit`` plans from these sizes.
Torch, diffusers and transformers are imported inside the functions: importing this is cheap.
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# Components without weights: nothing to count, and no config.json to read.
_WEIGHTLESS_PREFIXES = ("scheduler", "tokenizer", "feature_extractor", "image_processor")


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
    folder: Path, name: str, library: str, class_name: str, dtype: str, upcast_vae: bool
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
    if dtype == "float16" and config.get("force_upcast") and upcast_vae:
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
def _component_sizes(folder: str, dtype: str, upcast_vae: bool) -> tuple[ComponentSize, ...]:
    """Every weight-bearing component of the pipeline in ``folder`` (cached: FLUX takes ~1 s)."""
    path = Path(folder)
    index = _read_model_index(path)
    sizes = []
    for name, spec in sorted(index.items()):
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2:
            continue  # metadata and pipeline options such as force_zeros_for_empty_prompt
        library, class_name = spec
        if library is None or class_name is None or name.startswith(_WEIGHTLESS_PREFIXES):
            continue  # optional components listed as absent, and weightless ones
        size = _measure_component(path, name, library, class_name, dtype, upcast_vae)
        if size is not None:
            sizes.append(size)
    return tuple(sizes)


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, not {dtype!r}")


def component_sizes(
    model_dir: str | Path, dtype: str, upcast_vae: bool = False
) -> tuple[ComponentSize, ...]:
    """Every weight-bearing component of the pipeline in ``model_dir``, sized for ``dtype``."""
    _check_dtype(dtype)
    return _component_sizes(str(Path(model_dir).expanduser().resolve()), dtype, upcast_vae)


def component_weight_bytes(
    model_dir: str | Path, dtype: str, upcast_vae: bool = False
) -> dict[str, int]:
    """Weight bytes per pipeline component, in the dtype each runs in, counted without weights
    (``upcast_vae``: an fp16 VAE marked force_upcast is counted in float32, as SDXL runs it)."""
    return {size.name: size.weight_bytes for size in component_sizes(model_dir, dtype, upcast_vae)}
