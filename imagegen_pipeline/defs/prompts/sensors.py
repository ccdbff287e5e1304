"""Prompt CSVs dropped in the prompts folder become prompt-set partitions and runs."""

import hashlib
import json
from pathlib import Path

import dagster as dg

from imagegen_pipeline.defs.jobs import prepare_prompts_job
from imagegen_pipeline.defs.partitions import prompt_set_partitions
from imagegen_pipeline.defs.storage import StorageResource
from imagegen_pipeline.project_config import load_project_config
from imagegen_pipeline.prompt_csv import set_defaults_path
from imagegen_pipeline.prompt_folder import find_prompt_csvs


@dg.sensor(
    job=prepare_prompts_job,
    minimum_interval_seconds=load_project_config().sensor_interval_seconds,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def prompt_files_sensor(context: dg.SensorEvaluationContext, storage: StorageResource):
    """Register a partition per new CSV; prepare every new or changed file in its own run, so
    a bad file fails alone. A set that two files map to gets a run too, which fails naming
    both files."""
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    found = find_prompt_csvs(storage.prompts_folder())
    current = {name: _digest(paths) for name, paths in found.paths.items()}
    known = set(context.instance.get_dynamic_partitions(prompt_set_partitions.name))
    new_keys = sorted(set(current) - known)
    changed = sorted(name for name, digest in current.items() if seen.get(name) != digest)
    for name, message in found.problems.items():
        if name in changed:  # once per change, not on every tick
            context.log.error(message)
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


def _digest(paths: list[Path]) -> str:
    """What the sensor compares between ticks: a file's bytes and its sidecar's (and, for a set
    that several files map to, their names too, so renaming one of them counts as a change)."""
    digest = hashlib.sha256()
    for path in paths:
        if len(paths) > 1:
            digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes())
        sidecar = set_defaults_path(path)
        if sidecar.is_file():
            digest.update(b"\0sidecar\0" + sidecar.read_bytes())
    return digest.hexdigest()[:16]
