"""Run the whole graph for one prompt set in this process, on the embedded Dagster instance.

The demo, the integration tests and the benchmarks use this; the UI and the sensors run the
same assets through the jobs in ``defs/jobs.py``. A Dagster run has one partitions definition,
so a prompt set takes one run for its prompts, one per backend, and one for the comparison.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

from imagegen_pipeline.defs.partitions import prompt_set_partitions

RUNNER_PID_TAG = "imagegen/runner_pid"
PER_PROMPT_SET_GROUPS = ("prompts",)
PER_BACKEND_GROUPS = ("images", "clips", "quality")
AFTER_BACKENDS_GROUPS = ("comparison",)


def _groups_present(defs: dg.Definitions, groups: Sequence[str]) -> list[str]:
    asset_graph = defs.resolve_asset_graph()
    present = {asset_graph.get(key).group_name for key in asset_graph.materializable_asset_keys}
    return [group for group in groups if group in present]


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


def materialize_prompt_set(
    defs: dg.Definitions,
    prompt_set: str,
    backends: Sequence[str],
    *,
    instance: dg.DagsterInstance,
    resources: Mapping[str, Any] | None = None,
    raise_on_error: bool = True,
) -> list[dg.ExecuteInProcessResult]:
    """Materialize every asset of ``prompt_set`` for ``backends``; returns one result per run."""
    if prompt_set not in instance.get_dynamic_partitions(prompt_set_partitions.name):
        instance.add_dynamic_partitions(prompt_set_partitions.name, [prompt_set])
    assets = [*defs.assets, *(defs.asset_checks or [])]
    resources = dict(resources if resources is not None else defs.resources or {})

    def run(groups: Sequence[str], partition_key: str) -> dg.ExecuteInProcessResult | None:
        present = _groups_present(defs, groups)
        if not present:
            return None
        return dg.materialize(
            assets,
            selection=dg.AssetSelection.groups(*present),
            partition_key=partition_key,
            instance=instance,
            resources=resources,
            raise_on_error=raise_on_error,
            # Step events at INFO: the DEBUG stream of every event drowns the step logs.
            run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
            tags={"imagegen/prompt_set": prompt_set, RUNNER_PID_TAG: str(os.getpid())},
        )

    results = [run(PER_PROMPT_SET_GROUPS, prompt_set)]
    if results[0] is not None and results[0].success:
        for backend in backends:
            key = dg.MultiPartitionKey({"prompt_set": prompt_set, "backend": backend})
            results.append(run(PER_BACKEND_GROUPS, key))
        results.append(run(AFTER_BACKENDS_GROUPS, prompt_set))
    return [result for result in results if result is not None]
