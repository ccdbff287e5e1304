"""LoRA adapters named in a prompt CSV: parsed, resolved to local files, fingerprinted, checked.

A ``lora`` cell holds one or more adapters separated by ``;``, each ``source[:scale]``:

- a ``.safetensors`` file, or a folder holding ``pytorch_lora_weights.safetensors`` (what
  diffusers' ``save_lora_weights`` writes), relative to the CSV's folder or absolute;
- a Hugging Face repo id, found in the local cache only: steps never download.

The scale defaults to 1.0. An adapter's identity is the sha256 of its weight file, so a changed
file is a different adapter (content addresses include it with the scale) and a renamed one is
not. Which parts of a pipeline an adapter adapts is read from its tensor names (the safetensors
header, no torch), so a LoRA made for another architecture, such as an SDXL LoRA on FLUX, is
refused before any image of the set is generated.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ADAPTER_SEPARATOR = ";"
DEFAULT_SCALE = 1.0
MAX_ABS_SCALE = 4.0  # beyond this a LoRA burns the image; almost surely a typo
WEIGHT_FILE_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")

# Tensor-name prefixes of the LoRA formats diffusers loads, mapped to the pipeline component
# they adapt: diffusers' own ("unet.", "transformer.", "text_encoder."), and kohya/A1111's
# ("lora_unet_..."; FLUX's kohya files also say lora_unet_, but name double/single blocks).
_KOHYA_FLUX_BLOCKS = re.compile(r"^lora_unet_(double|single)_blocks")
_PREFIXES = (
    ("transformer.", "transformer"),
    ("unet.", "unet"),
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder.", "text_encoder"),
    ("lora_transformer_", "transformer"),
    ("lora_unet_", "unet"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te1_", "text_encoder"),
    ("lora_te_", "text_encoder"),
)
# The down (A) matrix of a layer, whose first dimension is the rank: PEFT's "lora_A[.name]",
# diffusers' "lora.down", kohya's "lora_down".
_LORA_DOWN = re.compile(r"(lora_A|lora\.down|lora_down)(\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraRef:
    """One adapter as the CSV names it."""

    source: str
    scale: float = DEFAULT_SCALE


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter resolved to its weight file on this machine."""

    source: str  # as the CSV names it, for the records
    path: Path  # the .safetensors file
    sha256: str  # of the file's bytes: the adapter's identity
    scale: float
    targets: frozenset[str]  # pipeline components it adapts ("unet", "transformer", ...)

    @property
    def adapter_name(self) -> str:
        """Its name inside a pipeline: from its bytes, so two CSV spellings share one load."""
        return f"lora_{self.sha256[:16]}"


def parse_lora_cell(cell: str) -> tuple[LoraRef, ...]:
    """The adapters of a ``lora`` cell; ValueError says what is wrong with which one."""
    refs = []
    for part in (p.strip() for p in cell.split(ADAPTER_SEPARATOR)):
        if not part:
            continue
        source, scale = part, DEFAULT_SCALE
        head, sep, tail = part.rpartition(":")
        if sep and head and not tail.startswith(("/", "\\")):
            try:
                scale = float(tail)
            except ValueError:
                raise ValueError(f"LoRA {part!r}: the scale after ':' must be a number") from None
            source = head.strip()
        if abs(scale) > MAX_ABS_SCALE:
            raise ValueError(f"LoRA {source!r}: scale {scale:g} is outside ±{MAX_ABS_SCALE:g}")
        refs.append(LoraRef(source, scale))
    sources = [ref.source for ref in refs]
    if len(set(sources)) != len(sources):
        raise ValueError(f"a LoRA is named twice in {cell!r}")
    return tuple(refs)


def _weight_file(ref: LoraRef, base_dir: Path) -> Path:
    local = Path(ref.source).expanduser()
    local = local if local.is_absolute() else base_dir / local
    if local.is_file():
        return local
    if local.is_dir():
        for name in WEIGHT_FILE_NAMES:
            if (local / name).is_file():
                return local / name
        raise FileNotFoundError(
            f"LoRA folder {str(local)!r} has none of {', '.join(WEIGHT_FILE_NAMES)}"
        )
    if "/" in ref.source and not ref.source.startswith((".", "/", "~")):
        from huggingface_hub import try_to_load_from_cache

        for name in WEIGHT_FILE_NAMES:
            found = try_to_load_from_cache(ref.source, name)
            if isinstance(found, str):
                return Path(found)
        raise FileNotFoundError(
            f"LoRA {ref.source!r} is neither a file under {base_dir} nor a hub repo in the local "
            f"cache: `imagegen models pull {ref.source}` on a machine that reaches the hub"
        )
    raise FileNotFoundError(f"LoRA file {str(local)!r} does not exist")


def safetensors_names(path: Path) -> list[str]:
    """The tensor names of a .safetensors file, from its JSON header (no tensor is read)."""
    return list(safetensors_shapes(path))


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in a .safetensors file, by name, from its JSON header."""
    with path.open("rb") as handle:
        header = handle.read(8)
        if len(header) != 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", header)
        if length > 100 * 2**20:
            raise ValueError(f"{path} is not a safetensors file (header of {length} bytes)")
        try:
            names = json.loads(handle.read(length))
        except ValueError:
            raise ValueError(f"{path} is not a safetensors file (unreadable header)") from None
    return {name: tuple(info["shape"]) for name, info in names.items() if name != "__metadata__"}


def _component_of(name: str) -> str | None:
    if _KOHYA_FLUX_BLOCKS.match(name):
        return "transformer"
    for prefix, component in _PREFIXES:
        if name.startswith(prefix):
            return component
    return None


def lora_targets(path: Path) -> frozenset[str]:
    """The pipeline components the adapter in ``path`` adapts, from its tensor names."""
    return frozenset(
        component
        for component in map(_component_of, safetensors_names(path))
        if component is not None
    )


def lora_rank(path: Path) -> int:
    """The adapter's rank: the largest inner dimension of its down (A) matrices."""
    shapes = safetensors_shapes(path)
    ranks = [shape[0] for name, shape in shapes.items() if _LORA_DOWN.search(name) and shape]
    return max(ranks, default=0)


def lora_elements(path: Path) -> dict[str, int]:
    """Parameters the adapter adds to each pipeline component it adapts (what it weighs
    once loaded, in the component's dtype: the memory planner's adapter share)."""
    elements: dict[str, int] = {}
    for name, shape in safetensors_shapes(path).items():
        component = _component_of(name)
        if component is not None:
            elements[component] = elements.get(component, 0) + math.prod(shape)
    return elements


@cache
def _fingerprint(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_lora(ref: LoraRef, base_dir: Path) -> LoraAdapter:
    """``ref`` found on this machine, fingerprinted and its targets read."""
    path = _weight_file(ref, base_dir).resolve()
    stat = path.stat()
    targets = lora_targets(path)
    if not targets:
        raise ValueError(f"LoRA {ref.source!r} ({path}): no tensor name of a known LoRA format")
    return LoraAdapter(
        ref.source, path, _fingerprint(path, stat.st_size, stat.st_mtime_ns), ref.scale, targets
    )


def lora_cell(adapters: Sequence[LoraAdapter]) -> str:
    """``adapters`` written back as a cell of absolute paths with their scales: what the
    validated prompt table keeps, so later steps resolve them without the CSV's folder."""
    return ADAPTER_SEPARATOR.join(f"{adapter.path}:{adapter.scale:g}" for adapter in adapters)


def adapters_of(cell: str) -> tuple[LoraAdapter, ...]:
    """The adapters of a validated cell (absolute paths), fingerprinted as they are now."""
    return tuple(resolve_lora(ref, Path("/")) for ref in parse_lora_cell(cell or ""))


def describe(adapters: Sequence[LoraAdapter]) -> str:
    """What an image's row and PNG record of its adapters: source, file hash and scale."""
    return json.dumps(
        [{"source": a.source, "sha256": a.sha256, "scale": a.scale} for a in adapters]
    )


def check_fits(adapter: LoraAdapter, components: Collection[str], backend: str) -> None:
    """Raise ValueError when ``adapter`` adapts a component ``backend``'s pipeline lacks."""
    foreign = sorted(adapter.targets - set(components))
    if foreign:
        raise ValueError(
            f"LoRA {adapter.source!r} adapts {', '.join(foreign)}, which {backend} does not have "
            f"(its components: {', '.join(sorted(components))}): it was made for another model"
        )
