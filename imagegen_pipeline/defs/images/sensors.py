"""Enhanced prompt sets go on to image generation with every enabled backend."""

import os

import dagster as dg

from imagegen_pipeline.defs.jobs import generate_images_job
from imagegen_pipeline.defs.partitions import LOCAL_BACKENDS


def enabled_backends() -> list[str]:
    """Backends that generate automatically: the local ones, and Gemini once it has a key."""
    return [*LOCAL_BACKENDS, *(["gemini"] if os.getenv("GEMINI_API_KEY") else [])]


@dg.asset_sensor(
    asset_key=dg.AssetKey("enhanced_prompts"),
    job=generate_images_job,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def generate_after_prompts_sensor(
    context: dg.SensorEvaluationContext, asset_event: dg.EventLogEntry
):
    """When a prompt set is enhanced, generate its images with every enabled backend."""
    prompt_set = asset_event.dagster_event.partition
    for backend in enabled_backends():
        yield dg.RunRequest(
            run_key=f"{asset_event.run_id}:{prompt_set}:{backend}",
            partition_key=dg.MultiPartitionKey({"prompt_set": prompt_set, "backend": backend}),
        )
