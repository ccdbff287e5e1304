"""The project's resources.

Each model's resource *is* its settings class from ``model_settings.py`` with
``dg.ConfigurableResource`` mixed in, so every field is declared once, and it is built from the
registry, so a new backend needs no resource code. Nothing here sets a value in Python: every
default is a class default that is resolved when a step starts (``model="auto"``, sizes left at
``None``, the Gemini key read from the environment). Dagster replaces a resource's Python-set
values with the class defaults when a run config sets any field of it, so values set here would
be silently dropped by a launchpad edit; class defaults cannot be.
"""

from imagegen_pipeline.defs.model_resources import settings_resource
from imagegen_pipeline.defs.prompts.resources import PromptEnhancerResource
from imagegen_pipeline.defs.quality.resources import QualityThresholds
from imagegen_pipeline.defs.storage import StepOutputIOManager, StorageResource, TableIOManager
from imagegen_pipeline.registry import MODELS


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
