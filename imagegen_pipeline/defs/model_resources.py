"""Model resources derived from the settings classes, one way: settings + ConfigurableResource.

A model's Dagster resource *is* its settings class from ``model_settings.py`` with
``dg.ConfigurableResource`` mixed in, so a field, its type, default and description are declared
once, and a new backend needs no resource code.
"""

from functools import cache

import dagster as dg
from pydantic import BaseModel


@cache
def settings_resource(settings: type[BaseModel]) -> type[dg.ConfigurableResource]:
    """The Dagster resource whose fields are exactly the fields of ``settings``."""
    name = settings.__name__.removesuffix("Settings") + "Resource"
    namespace = {"__doc__": settings.__doc__, "__module__": __name__}
    return type(name, (dg.ConfigurableResource, settings), namespace)


def settings_of(resource: dg.ConfigurableResource, settings: type[BaseModel]) -> BaseModel:
    """The plain settings object a model resource holds (what model code is given)."""
    return settings(**{name: getattr(resource, name) for name in settings.model_fields})
