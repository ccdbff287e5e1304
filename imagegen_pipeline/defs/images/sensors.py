"""Automation of image generation: after prompts are enhanced, and on a schedule in bulk.

Both ask for as few runs as possible: one run per backend, spanning every prompt set that needs
work, with ``BackfillPolicy.single_run`` assets loading each model once. Prompt sets inside the
span that are already complete cost a folder listing each (content-addressed skip), no model.
"""

import hashlib
from collections.abc import Iterable, Mapping, Sequence

import dagster as dg
from dagster._core.storage.tags import (  # the tags Dagster itself uses for partition ranges
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from imagegen_pipeline.defs.jobs import generate_images_job, prepare_prompts_job
from imagegen_pipeline.defs.metadata import latest_materialization
from imagegen_pipeline.defs.partitions import (
    partition_key,
    prompt_set_partitions,
    prompt_set_x_backend_partitions,
    split_key,
)
from imagegen_pipeline.defs.prompts.assets import enhanced_prompts
from imagegen_pipeline.project_config import load_project_config
from imagegen_pipeline.registry import project_backends

ENHANCED_PROMPTS = enhanced_prompts.key
IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]
FINAL_ASSET = dg.AssetKey("video_quality")  # a prompt set x backend is done when this is


def generation_requests(
    instance: dg.DagsterInstance, sets_by_backend: Mapping[str, Iterable[str]], reason: str
) -> list[dg.RunRequest]:
    """One run per backend over the span of its prompt sets (in partition order)."""
    all_sets = instance.get_dynamic_partitions(prompt_set_partitions.name)
    requests = []
    for backend, prompt_sets in sets_by_backend.items():
        wanted = set(prompt_sets)
        ordered = [s for s in all_sets if s in wanted]
        if not ordered:
            continue
        first, last = ordered[0], ordered[-1]
        digest = hashlib.sha256(",".join(ordered).encode()).hexdigest()[:12]
        start, end = partition_key(first, backend), partition_key(last, backend)
        tags = {"imagegen/reason": reason, "imagegen/prompt_sets": ",".join(ordered)[:4000]}
        if first == last:
            requests.append(
                dg.RunRequest(
                    run_key=f"{reason}:{backend}:{digest}", partition_key=start, tags=tags
                )
            )
        else:
            tags |= {
                ASSET_PARTITION_RANGE_START_TAG: str(start),
                ASSET_PARTITION_RANGE_END_TAG: str(end),
            }
            requests.append(dg.RunRequest(run_key=f"{reason}:{backend}:{digest}", tags=tags))
    return requests


@dg.sensor(
    job=generate_images_job,
    minimum_interval_seconds=load_project_config().sensor_interval_seconds,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def generate_after_prompts_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """When prompt sets are enhanced, generate their images with every enabled backend.

    The cursor is the storage id of the last ``enhanced_prompts`` materialization handled, so
    every set enhanced since the last tick is seen, however many landed in one tick; a set and
    backend that a run started since has finished (the first start after ``imagegen demo``,
    say) is left alone. While
    prompt sets are still being prepared it waits, so that sets dropped together are generated
    together: one run, and one model load, per backend."""
    preparing = context.instance.get_run_records(
        dg.RunsFilter(job_name=prepare_prompts_job.name, statuses=IN_FLIGHT), limit=1
    )
    if preparing:
        return dg.SensorResult(
            skip_reason="Waiting for the prompt sets being prepared, to generate them together.",
            cursor=context.cursor,
        )
    result = context.instance.fetch_materializations(
        ENHANCED_PROMPTS, limit=1000, cursor=context.cursor, ascending=True
    )
    enhanced_at = {
        record.partition_key: record.timestamp
        for record in result.records
        if record.partition_key is not None
    }
    backends = project_backends(load_project_config())
    done = context.instance.get_materialized_partitions(FINAL_ASSET)
    wanted = {
        backend: {
            prompt_set
            for prompt_set, since in enhanced_at.items()
            if str(partition_key(prompt_set, backend)) not in done
            or not finished_since(context.instance, prompt_set, backend, since)
        }
        for backend in backends
    }
    requests = generation_requests(context.instance, wanted, "enhanced")
    skip_reason = None
    if not requests:
        skip_reason = (
            f"{len(enhanced_at)} prompt set(s) enhanced since the last tick, each already "
            "finished by a run started since."
            if enhanced_at
            else "No prompt set enhanced since the last tick."
        )
    return dg.SensorResult(
        run_requests=requests, cursor=result.cursor or context.cursor, skip_reason=skip_reason
    )


def finished_since(
    instance: dg.DagsterInstance, prompt_set: str, backend: str, since: float
) -> bool:
    """Whether a run started after ``since`` (a timestamp) has finished the partition: it read
    the prompts enhanced then (``imagegen demo``, a backfill, a launch from the CLI), so
    generating again would only find its outputs."""
    final = latest_materialization(instance, FINAL_ASSET, str(partition_key(prompt_set, backend)))
    run = instance.get_run_record_by_id(final.run_id) if final else None
    return run is not None and run.start_time is not None and run.start_time > since


def unfinished_partitions(
    instance: dg.DagsterInstance, backends: Sequence[str]
) -> dict[str, set[str]]:
    """Per backend, the enhanced prompt sets whose pipeline is missing or failed."""
    enhanced = instance.get_materialized_partitions(ENHANCED_PROMPTS)
    keys = [str(partition_key(s, b)) for s in sorted(enhanced) for b in backends]
    if not keys:
        return {}
    done = instance.get_materialized_partitions(FINAL_ASSET)
    status = instance.get_status_by_partition(FINAL_ASSET, keys, prompt_set_x_backend_partitions)
    failed = {key for key, state in (status or {}).items() if state and state.value == "FAILED"}
    unfinished: dict[str, set[str]] = {}
    for prompt_set in enhanced:
        for backend in backends:
            key = str(partition_key(prompt_set, backend))
            if key not in done or key in failed:
                unfinished.setdefault(backend, set()).add(prompt_set)
    return unfinished


def in_flight_sets(instance: dg.DagsterInstance) -> dict[str, set[str]]:
    """Per backend, the prompt sets of generate runs that are queued or running."""
    runs = instance.get_run_records(
        dg.RunsFilter(job_name=generate_images_job.name, statuses=IN_FLIGHT)
    )
    busy: dict[str, set[str]] = {}
    for record in runs:
        tags = record.dagster_run.tags
        first = tags.get("dagster/partition") or tags.get(ASSET_PARTITION_RANGE_START_TAG)
        if not first:
            continue
        prompt_set, backend = split_key(first)
        listed = tags.get("imagegen/prompt_sets")
        busy.setdefault(backend, set()).update(listed.split(",") if listed else [prompt_set])
    return busy


@dg.schedule(
    job=generate_images_job,
    cron_schedule=load_project_config().bulk_cron,
    default_status=dg.DefaultScheduleStatus.STOPPED,
)
def bulk_generation_schedule(context: dg.ScheduleEvaluationContext):
    """Every prompt set x enabled backend that is missing or failed, one run per backend.

    Off until turned on (the toggle in the UI, or ``dagster schedule start``); the cron is
    ``bulk_cron`` in imagegen.toml or IMAGEGEN_BULK_CRON."""
    backends = project_backends(load_project_config())
    todo = unfinished_partitions(context.instance, backends)
    # A set whose run is still queued or running is not asked for again by a later tick.
    for backend, prompt_sets in in_flight_sets(context.instance).items():
        if backend in todo:
            todo[backend] -= prompt_sets
    todo = {backend: sets for backend, sets in todo.items() if sets}
    if not todo:
        return dg.SkipReason("Every prompt set is generated, scored and compared.")
    stamp = context.scheduled_execution_time.isoformat()
    return generation_requests(context.instance, todo, f"bulk:{stamp}")
