"""A backend's settings for one prompt set: the resource's, with the set sidecar's table over.

A sidecar ``<set>.toml`` beside a CSV may hold a ``[<backend>]`` table of the settings that
backend's spec lists in ``per_set_settings`` (``prompt_csv.read_set_defaults`` refuses others);
e.g. ``[gemini] mode = "batch"`` sends that set through the Batch API while every other set
stays online. Values are checked by the settings class, naming the sidecar.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from imagegen_pipeline.prompt_csv import read_set_defaults, set_defaults_path
from imagegen_pipeline.prompt_folder import find_prompt_csvs

S = TypeVar("S", bound=BaseModel)


def settings_for_set(settings: S, backend: str, prompts_folder: Path, prompt_set: str) -> S:
    """``settings`` with the ``[backend]`` table of ``prompt_set``'s sidecar over them (the
    same object when the set has none)."""
    if not prompts_folder.is_dir():
        return settings
    csv_path = find_prompt_csvs(prompts_folder).files.get(prompt_set)
    if csv_path is None:
        return settings
    table = read_set_defaults(csv_path).backend_settings.get(backend)
    if not table:
        return settings
    try:
        return type(settings).model_validate({**settings.model_dump(), **table})
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ValueError(
            f"{set_defaults_path(csv_path)}, [{backend}] {where}: {first['msg']}"
        ) from None
