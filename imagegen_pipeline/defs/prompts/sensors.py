"""Prompt CSVs dropped in the prompts folder become prompt-set partitions and runs."""

import hashlib
import json

import dagster as dg

from imagegen_pipeline.defs.jobs import prepare_prompts_job
from imagegen_pipeline.defs.partitions import prompt_set_partitions
from imagegen_pipeline.defs.prompts.assets import prompt_csv_files
from imagegen_pipeline.defs.storage import StorageResource
from imagegen_pipeline.project_config import load_project_config


@dg.sensor(
    job=prepare_prompts_job,
    minimum_interval_seconds=load_project_config().sensor_interval_seconds,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def prompt_files_sensor(context: dg.SensorEvaluationContext, storage: StorageResource):
    """Register a partition per new CSV; prepare every new or changed file in its own run, so
    a bad file fails alone."""
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    current = {
        name: hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        for name, path in prompt_csv_files(storage.prompts_folder()).items()
    }
    known = set(context.instance.get_dynamic_partitions(prompt_set_partitions.name))
    new_keys = sorted(set(current) - known)
    changed = sorted(name for name, digest in current.items() if seen.get(name) != digest)
    if not changed and not new_keys:
        return dg.SkipReason(f"No new or changed CSV in {storage.prompts_folder()}/")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(run_key=f"{name}:{current[name]}", partition_key=name) for name in changed
        ],
        dynamic_partitions_requests=[prompt_set_partitions.build_add_request(new_keys)]
        if new_keys
        else [],
        cursor=json.dumps(current),
    )
