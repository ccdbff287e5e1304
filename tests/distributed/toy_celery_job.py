"""A toy two-op job on dagster-celery, for finding out how the celery executor behaves.

``prepare`` has no queue tag, so it goes to dagster-celery's default queue ``dagster``;
``render`` carries ``{"dagster-celery/queue": "gpu"}`` like the project's GPU steps and goes to
the ``gpu`` workers. Outputs are pickled to S3 (dagster-aws' ``s3_pickle_io_manager``, the
endpoint and bucket come from run config), since celery steps run in other processes.

Each op reports, as output metadata, the process it ran in and the state of a module-level
"model cache" in that process, which tells whether a per-process cache stays warm between
steps and runs executed by the same worker.

Runs are orchestrated in a subprocess (``python -c "from tests.distributed.toy_celery_job
import main; main()" ...``) so that a test can bound, interrupt or kill the orchestrator.
"""

import argparse
import json
import os
import socket
import sys
import time
from typing import Any

import dagster as dg
from dagster_aws.s3 import s3_pickle_io_manager, s3_resource
from dagster_celery import celery_executor

GPU_QUEUE = "gpu"

# A per-process stand-in for a loaded model: filled by the first step in a process, reused
# by later ones as long as the process lives.
MODEL_CACHE: dict[str, dict[str, Any]] = {}
STEPS_IN_PROCESS = {"count": 0}


def _use_model(name: str) -> dict[str, Any]:
    STEPS_IN_PROCESS["count"] += 1
    warm = name in MODEL_CACHE
    if not warm:
        MODEL_CACHE[name] = {"loaded_by_pid": os.getpid(), "loaded_at": time.time()}
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "cache_warm": warm,
        "cache_loaded_by_pid": MODEL_CACHE[name]["loaded_by_pid"],
        "steps_in_process": STEPS_IN_PROCESS["count"],
    }


@dg.op
def prepare(context: dg.OpExecutionContext) -> dict[str, Any]:
    info = _use_model("text-encoder")
    context.add_output_metadata(info)
    return info


@dg.op(
    tags={"dagster-celery/queue": GPU_QUEUE},
    config_schema={"sleep_seconds": dg.Field(float, default_value=0.0)},
)
def render(context: dg.OpExecutionContext, prepared: dict[str, Any]) -> dict[str, Any]:
    info = _use_model("diffusion-model")
    context.log.info(f"render started in pid {info['pid']}")
    time.sleep(context.op_config["sleep_seconds"])
    context.add_output_metadata(info)
    return {**info, "prepared_by_pid": prepared["pid"]}


@dg.job(
    executor_def=celery_executor,
    resource_defs={"io_manager": s3_pickle_io_manager, "s3": s3_resource},
)
def toy_celery_job() -> None:
    render(prepare())


def toy_run_config(
    broker_url: str,
    s3_endpoint: str,
    bucket: str,
    *,
    sleep_seconds: float = 0.0,
    backend_url: str | None = None,
    config_source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run config: the celery executor on ``broker_url``, outputs on the S3 server."""
    execution: dict[str, Any] = {"broker": broker_url, "backend": backend_url or broker_url}
    if config_source:
        execution["config_source"] = config_source
    return {
        "execution": {"config": execution},
        "ops": {"render": {"config": {"sleep_seconds": sleep_seconds}}},
        "resources": {
            "io_manager": {"config": {"s3_bucket": bucket, "s3_prefix": "toy"}},
            "s3": {
                "config": {
                    "endpoint_url": s3_endpoint,
                    "region_name": "us-east-1",
                    "aws_access_key_id": "testing",
                    "aws_secret_access_key": "testing",
                }
            },
        },
    }


def main(argv: list[str] | None = None) -> None:
    """Orchestrate one run of the toy job (in this process) on the instance of $DAGSTER_HOME.

    ``--run-config JSON --tags JSON [--from-failure PARENT_RUN_ID]``; prints the run id and its
    success as JSON. SIGTERM is turned into an interrupt like dagster's own CLI does, so the
    celery executor revokes its tasks and the run ends (as failed) instead of hanging.
    """
    from dagster._utils.interrupts import setup_interrupt_handlers

    parser = argparse.ArgumentParser()
    parser.add_argument("--run-config", required=True)
    parser.add_argument("--tags", default="{}")
    parser.add_argument("--from-failure", default=None)
    args = parser.parse_args(argv)
    setup_interrupt_handlers()

    options = None
    with dg.DagsterInstance.get() as instance:
        if args.from_failure:
            options = dg.ReexecutionOptions.from_failure(args.from_failure, instance)
        result = dg.execute_job(
            dg.reconstructable(toy_celery_job),
            instance=instance,
            run_config=json.loads(args.run_config),
            tags=json.loads(args.tags),
            reexecution_options=options,
        )
        print(json.dumps({"run_id": result.run_id, "success": result.success}), flush=True)
    sys.exit(0 if result.success else 1)
