"""Collecting Gemini batch jobs without holding anything while they run.

A partition in batch mode submits its jobs in its images step, waits up to
``batch_wait_seconds`` (a minute by default) and finishes, recording the images still in a job
``pending``: no run, worker or pool slot is held for the hours a batch may take.
``gemini_batch_sensor`` then looks at every open job of the ``batch_jobs`` run metadata (one
``batches.get`` each) and, when one has finished or passed its deadline, asks for a run of its
partition; that run's images step finds the job in the ledger, reads its results (or cancels
it) and writes the images. A job's run is asked for once per state (the run key), and never
while a run of the partition is queued or running.
"""

from typing import Any

import dagster as dg

from imagegen_pipeline.defs.images.sensors import in_flight_sets
from imagegen_pipeline.defs.jobs import generate_images_job
from imagegen_pipeline.defs.model_resources import settings_of
from imagegen_pipeline.defs.partitions import partition_key
from imagegen_pipeline.project_config import api_key, load_project_config
from imagegen_pipeline.records import utc_now
from imagegen_pipeline.registry import IMAGE_BACKENDS, backend_spec

# The hosted backends with a batch mode: their resources are read to ask about their jobs.
BATCH_BACKENDS = frozenset(
    spec.name
    for spec in IMAGE_BACKENDS
    if not spec.is_local and "mode" in spec.settings.model_fields
)


@dg.sensor(
    job=generate_images_job,
    minimum_interval_seconds=max(60, load_project_config().sensor_interval_seconds),
    default_status=dg.DefaultSensorStatus.RUNNING,
    required_resource_keys={"storage", *BATCH_BACKENDS},
)
def gemini_batch_sensor(context: dg.SensorEvaluationContext) -> Any:
    """A run of each partition whose Gemini batch job finished (or is past its deadline)."""
    # Imported here: google-genai, which loading the definitions must not import.
    from imagegen_pipeline.backends.gemini.batch import BatchClient
    from imagegen_pipeline.steps.gemini_batch import close_done_jobs, open_batch_jobs

    storage = context.resources.storage.storage()
    jobs = close_done_jobs(storage, open_batch_jobs(storage))
    if not jobs:
        return dg.SkipReason("No open Gemini batch job.")
    busy = in_flight_sets(context.instance)
    clients: dict[str, Any] = {}
    ready: dict[tuple[str, str], list[str]] = {}
    for job in jobs:
        if job.prompt_set in busy.get(job.backend, set()):
            continue  # its partition's run will look at it
        if job.status != "open":  # created by a killed run, maybe: its next run looks it up
            ready.setdefault((job.prompt_set, job.backend), []).append(job.display_name)
            continue
        if job.backend not in clients:
            spec = backend_spec(job.backend)
            settings = settings_of(getattr(context.resources, job.backend), spec.settings)
            key = settings.api_key or (api_key(spec.key_env_var) if spec.key_env_var else None)
            clients[job.backend] = BatchClient(settings.model_copy(update={"api_key": key}))
        client = clients[job.backend]
        try:
            status = client.status(job.job_name)
        except Exception as error:  # the API is down: ask again next tick
            context.log.warning(f"Gemini batch job {job.job_name}: {client.describe(error)}")
            continue
        late = job.deadline_at is not None and utc_now() >= job.deadline_at
        if status.finished or late:
            ready.setdefault((job.prompt_set, job.backend), []).append(
                f"{job.job_name}:{'late' if late and not status.finished else status.state}"
            )
    for client in clients.values():
        client.close()
    if not ready:
        return dg.SkipReason(f"{len(jobs)} Gemini batch job(s) open, none finished.")
    return [
        dg.RunRequest(
            run_key="gemini-batch:" + ",".join(sorted(names)),
            partition_key=str(partition_key(prompt_set, backend)),
            tags={"imagegen/reason": "gemini-batch-collect"},
        )
        for (prompt_set, backend), names in sorted(ready.items())
    ]
