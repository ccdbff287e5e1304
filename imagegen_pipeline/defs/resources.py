"""The project's resources.

Each model's resource *is* its settings class from ``model_settings.py`` with
``dg.ConfigurableResource`` mixed in, so every field is declared once, and it is built from the
registry, so a new backend needs no resource code. Nothing here sets a value in Python: every
default is a class default that is resolved when a step starts (``model="auto"``, sizes left at
``None``, the Gemini key read from the environment). Dagster replaces a resource's Python-set
values with the class defaults when a run config sets any field of it, so values set here would
be silently dropped by a launchpad edit; class defaults cannot be.
"""

from functools import cache

import dagster as dg
from pydantic import BaseModel

from imagegen_pipeline.defs.prompts.resources import PromptEnhancerResource
from imagegen_pipeline.defs.quality.resources import QualityThresholds
from imagegen_pipeline.defs.storage import StepOutputIOManager, StorageResource, TableIOManager
from imagegen_pipeline.registry import MODELS


@cache
def settings_resource(settings: type[BaseModel]) -> type[dg.ConfigurableResource]:
    """The Dagster resource whose fields are exactly the fields of ``settings``."""
    name = settings.__name__.removesuffix("Settings") + "Resource"
    namespace = {"__doc__": settings.__doc__, "__module__": __name__}
    return type(name, (dg.ConfigurableResource, settings), namespace)


def settings_of(resource: dg.ConfigurableResource, settings: type[BaseModel]) -> BaseModel:
    """The plain settings object a model resource holds (what model code is given)."""
    return settings(**{name: getattr(resource, name) for name in settings.model_fields})


def default_resources() -> dict[str, object]:
    """Every resource the definitions use, all at their class defaults (see module docstring)."""
    storage = StorageResource()
    return {
        "storage": storage,
        "io_manager": TableIOManager(storage=storage),
        "step_io_manager": StepOutputIOManager(storage=storage),
        "enhancer": PromptEnhancerResource(),
        "quality_thresholds": QualityThresholds(),
        **{name: settings_resource(spec.settings)() for name, spec in MODELS.items()},
    }
