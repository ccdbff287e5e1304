"""How each cell of a prompt CSV is read and checked, in the words of the person editing it.

Each function is a pydantic validator of one ``PromptRow`` column (``prompt_csv.py``); a
``ValueError`` message becomes the row's rejection reason.
"""

import re
from pathlib import Path
from typing import Any

from pydantic import BeforeValidator, ValidationInfo

from imagegen_pipeline.control import (
    CONTROL_TYPES,
    DEFAULT_CONTROL_TYPE,
    MAX_CONTROL_SCALE,
    resolve_control_image,
)
from imagegen_pipeline.lora import check_fits, lora_cell, parse_lora_cell, resolve_lora
from imagegen_pipeline.registry import ANY_BACKEND, BACKEND_NAMES, SCORERS, backend_spec

STYLES = ("photorealistic", "artistic", "cinematic", "anime", "none")


def int_range(lo: int, hi: int, multiple: int = 1) -> BeforeValidator:
    """An integer cell in [lo, hi] that is a multiple of ``multiple``.

    Custom, because pydantic reports only the bound that was crossed.
    """

    def check(raw: Any, info: ValidationInfo) -> int:
        field = info.field_name
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"{field} must be an integer, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ValueError(f"{field} must be between {lo} and {hi}, got {value}")
        if value % multiple:
            raise ValueError(f"{field} must be a multiple of {multiple}, got {value}")
        return value

    return BeforeValidator(check)


def style(raw: str) -> str:
    style = raw.lower()
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; use one of {', '.join(STYLES)}")
    return style


def backends(raw: str | list[str]) -> list[str]:
    names = [part for part in re.split(r"[;,|\s]+", raw) if part] if isinstance(raw, str) else raw
    if list(names) == [ANY_BACKEND]:  # the pipeline picks (hybrid overflow, steps/hybrid.py)
        return [ANY_BACKEND]
    unknown = [name for name in names if name not in BACKEND_NAMES]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}; use {', '.join(BACKEND_NAMES)}")
    return list(names) or list(BACKEND_NAMES)  # none named: every backend


def loras(cell: str, info: ValidationInfo) -> str:
    """Adapters found (relative to the CSV's folder) and fitting every backend of the row,
    written back with absolute paths; a clear reason for the first that does not."""
    if not cell:
        return ""
    folder = Path((info.context or {}).get("folder", "."))
    try:
        adapters = [resolve_lora(ref, folder) for ref in parse_lora_cell(cell)]
    except (OSError, ValueError) as error:
        raise ValueError(str(error)) from None
    named = info.data.get("backends") or BACKEND_NAMES
    for name in BACKEND_NAMES if ANY_BACKEND in named else named:
        spec = backend_spec(name)
        for adapter in adapters:
            try:
                check_fits(adapter, spec.lora_components, name)
            except ValueError as error:
                raise ValueError(f"{error}; list the backends it fits in `backends`") from None
    return lora_cell(adapters)


def control_image(cell: str, info: ValidationInfo) -> str:
    """The control image found (relative to the CSV's folder), written back absolute."""
    if not cell:
        return ""
    folder = Path((info.context or {}).get("folder", "."))
    return str(resolve_control_image(cell, folder))


def control_type(raw: str, info: ValidationInfo) -> str:
    """A known type; the default type for a row with an image; none without one."""
    control_type = raw.lower()
    if control_type and control_type not in CONTROL_TYPES:
        raise ValueError(f"unknown control_type {raw!r}; use one of {', '.join(CONTROL_TYPES)}")
    if "control_image" not in info.data:  # the image itself was rejected: said there
        return control_type
    if not info.data["control_image"]:
        # A set's defaults may name the type while only some rows bring an image.
        if control_type and "control_type" not in (info.context or {}).get("from_set", ()):
            raise ValueError("control_type needs a control_image")
        return ""
    return control_type or DEFAULT_CONTROL_TYPE


def control_scale(raw: Any) -> float:
    try:
        scale = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"control_scale must be a number, got {raw!r}") from None
    if not 0.0 <= scale <= MAX_CONTROL_SCALE:
        raise ValueError(f"control_scale must be between 0 and {MAX_CONTROL_SCALE}, got {scale}")
    return scale


def scorer(raw: str) -> str:
    """A known scorer, or empty for the project's default."""
    if raw and raw not in SCORERS:
        raise ValueError(f"unknown scorer {raw!r}; use one of {', '.join(SCORERS)}")
    return raw
