"""What the images step of a partition runs with: its settings for the prompt set (the
sidecar's table over the resource), its output kind (batch or not), and the routing of rows
whose ``backends`` cell is ``any`` (hybrid overflow, ``steps/hybrid.py``)."""

from collections.abc import Callable
from typing import Any

import dagster as dg
import pandas as pd

from imagegen_pipeline.defs.model_resources import settings_of
from imagegen_pipeline.registry import IMAGE_BACKENDS, LOCAL_BACKEND_NAMES
from imagegen_pipeline.steps.hybrid import (
    Routing,
    first_local_backend,
    has_any_rows,
    routed_prompts,
)
from imagegen_pipeline.steps.images import ImagesKind
from imagegen_pipeline.steps.set_settings import settings_for_set

# Rows with backends "any" overflow to the first hosted backend (Gemini).
OVERFLOW_SPEC = next((spec for spec in IMAGE_BACKENDS if not spec.is_local), None)


def set_settings(context: Any, warm: Any, backend: str, prompt_set: str) -> Any:
    """The backend's settings for this set; a bad sidecar value fails the step, naming it."""
    folder = context.resources.storage.prompts_folder()
    try:
        return settings_for_set(warm.settings, backend, folder, prompt_set)
    except ValueError as error:
        raise dg.Failure(description=str(error)) from None


def images_kind(settings: Any) -> type[ImagesKind]:
    """Batch mode's output kind for a backend whose settings ask for it."""
    if getattr(settings, "mode", "online") != "batch":
        return ImagesKind
    # Imported here: it imports google-genai, which loading the definitions must not.
    from imagegen_pipeline.steps.gemini_batch import BatchImagesKind

    return BatchImagesKind


def route(
    context: Any, prompts: pd.DataFrame, prompt_set: str, log: Callable[[str], None]
) -> tuple[pd.DataFrame, Routing | None]:
    """``prompts`` with its ``any`` rows routed (see ``steps/hybrid.py``)."""
    if OVERFLOW_SPEC is None or not LOCAL_BACKEND_NAMES or not has_any_rows(prompts):
        return prompts, None
    resource = getattr(context.resources, OVERFLOW_SPEC.name, None)
    if resource is None:
        return prompts, None
    folder = context.resources.storage.prompts_folder()
    settings = settings_for_set(
        settings_of(resource, OVERFLOW_SPEC.settings), OVERFLOW_SPEC.name, folder, prompt_set
    )
    try:
        return routed_prompts(
            context.resources.storage.storage(),
            prompt_set,
            prompts,
            local_backend=first_local_backend(
                LOCAL_BACKEND_NAMES, getattr(settings, "overflow_local_backend", None)
            ),
            overflow_backend=OVERFLOW_SPEC.name,
            settings=settings,
            log=log,
        )
    except ValueError as error:  # an unknown model's price, a bad local backend name
        raise dg.Failure(description=f"{prompt_set}: backends=any: {error}") from None
