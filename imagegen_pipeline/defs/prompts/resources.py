"""How prompts are enhanced, per prompt set: the enhancer settings as a Dagster resource."""

from imagegen_pipeline.defs.model_resources import settings_resource
from imagegen_pipeline.model_settings import EnhancerSettings

# Its fields are EnhancerSettings' (model_settings.py), declared there once.
PromptEnhancerResource = settings_resource(EnhancerSettings)
