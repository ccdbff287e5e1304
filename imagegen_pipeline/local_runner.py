"""Run the whole graph for prompt sets in this process, on the embedded Dagster instance.

The demo, integration tests and benchmarks use this; it runs the jobs of ``defs/jobs.py``, the
ones the UI, the sensors and the schedule launch. Every asset takes whole partition ranges
(single-run backfill policy), so any number of prompt sets costs one run for the prompts, one
per backend, and one for the comparison, and each model loads once per run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
from dagster._core.storage.tags import (  # the tags Dagster itself uses for partition ranges
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from imagegen_pipeline.defs.jobs import (
    compare_backends_job,
    generate_images_job,
    prepare_prompts_job,
)
from imagegen_pipeline.defs.partitions import partition_key, prompt_set_partitions

RUNNER_PID_TAG = "imagegen/runner_pid"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_interrupted_runs(instance: dg.DagsterInstance) -> list[str]:
    """Fail the in-process runs whose process died (killed, machine rebooted).

    Such a run still holds its ``gpu`` pool slot, and with one slot every later GPU step would
    wait for it forever; its slots are freed. Returns the ids of the runs released.
    """
    in_progress = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
    records = instance.get_run_records(filters=dg.RunsFilter(statuses=in_progress))
    released = []
    for record in records:
        run = record.dagster_run
        pid = run.tags.get(RUNNER_PID_TAG)
        if pid is None or _process_alive(int(pid)):
            continue
        instance.report_run_failed(run, "Interrupted: the process running it is gone.")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        released.append(run.run_id)
    return released


def range_tags(first: str, last: str) -> dict[str, str]:
    """Run tags that make one run cover the partition keys from ``first`` to ``last``."""
    return {ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last}


def materialize_prompt_sets(
    defs: dg.Definitions,
    prompt_sets: Sequence[str],
    backends: Sequence[str],
    *,
    instance: dg.DagsterInstance,
    resources: Mapping[str, Any] | None = None,
    raise_on_error: bool = True,
) -> list[dg.ExecuteInProcessResult]:
    """Materialize every asset of ``prompt_sets`` for ``backends``; returns one result per run."""
    known = instance.get_dynamic_partitions(prompt_set_partitions.name)
    new = [name for name in prompt_sets if name not in known]
    if new:
        instance.add_dynamic_partitions(prompt_set_partitions.name, new)
    ordered = [
        s for s in instance.get_dynamic_partitions(prompt_set_partitions.name) if s in prompt_sets
    ]
    if resources is not None:  # the same assets, checks and jobs over other resources
        defs = dg.Definitions(
            assets=defs.assets,
            asset_checks=defs.asset_checks,
            jobs=defs.jobs,
            resources=dict(resources),
        )

    def run(job: Any, first: str, last: str) -> dg.ExecuteInProcessResult:
        return defs.resolve_job_def(job.name).execute_in_process(
            instance=instance,
            raise_on_error=raise_on_error,
            # Step events at INFO: the DEBUG stream of every event drowns the step logs.
            run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
            tags={**range_tags(first, last), RUNNER_PID_TAG: str(os.getpid())},
        )

    first, last = ordered[0], ordered[-1]
    results = [run(prepare_prompts_job, first, last)]
    if not results[0].success:
        return results
    for backend in backends:
        start, end = str(partition_key(first, backend)), str(partition_key(last, backend))
        results.append(run(generate_images_job, start, end))
    results.append(run(compare_backends_job, first, last))
    return results
