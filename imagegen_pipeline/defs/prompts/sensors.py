"""Prompt CSVs dropped in the prompts folder become prompt-set partitions and runs."""

import json

import dagster as dg

from imagegen_pipeline.defs.jobs import prepare_prompts_job
from imagegen_pipeline.defs.metadata import latest_materialization
from imagegen_pipeline.defs.partitions import prompt_set_partitions
from imagegen_pipeline.defs.prompts.assets import SOURCE_DIGEST, enhanced_prompts
from imagegen_pipeline.defs.storage import StorageResource
from imagegen_pipeline.project_config import load_project_config
from imagegen_pipeline.prompt_csv import source_digest
from imagegen_pipeline.prompt_folder import find_prompt_csvs

PROMPTS = dg.AssetKey("prompts")


def prepared_digest(instance: dg.DagsterInstance, prompt_set: str) -> str | None:
    """The source digest a prompt set was last prepared from (read by ``prompts``, then
    enhanced), or None when it was never prepared to the end."""
    read = latest_materialization(instance, PROMPTS, prompt_set)
    enhanced = latest_materialization(instance, enhanced_prompts.key, prompt_set)
    if read is None or enhanced is None or enhanced.storage_id < read.storage_id:
        return None
    entry = read.asset_materialization.metadata.get(SOURCE_DIGEST)
    return str(entry.value) if entry is not None else None


@dg.sensor(
    job=prepare_prompts_job,
    minimum_interval_seconds=load_project_config().sensor_interval_seconds,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def prompt_files_sensor(context: dg.SensorEvaluationContext, storage: StorageResource):
    """Register a partition per new CSV; prepare every new or changed file in its own run, so
    a bad file fails alone. A set that two files map to gets a run too, which fails naming
    both files.

    A file the cursor has not seen yet (the first start, say) that was prepared as it is now,
    by ``imagegen demo`` or a launch from the CLI, is not prepared again."""
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    found = find_prompt_csvs(storage.prompts_folder())
    current = {name: source_digest(paths) for name, paths in found.paths.items()}
    known = set(context.instance.get_dynamic_partitions(prompt_set_partitions.name))
    new_keys = sorted(set(current) - known)
    for name in sorted(set(current) - set(seen)):
        if name in known and prepared_digest(context.instance, name) == current[name]:
            seen[name] = current[name]
    changed = sorted(name for name, digest in current.items() if seen.get(name) != digest)
    for name, message in found.problems.items():
        if name in changed:  # once per change, not on every tick
            context.log.error(message)
    if not changed and not new_keys:
        return dg.SensorResult(
            skip_reason=f"No new or changed CSV in {storage.prompts_folder()}/",
            cursor=json.dumps(current),
        )
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(run_key=f"{name}:{current[name]}", partition_key=name) for name in changed
        ],
        dynamic_partitions_requests=[prompt_set_partitions.build_add_request(new_keys)]
        if new_keys
        else [],
        cursor=json.dumps(current),
    )
