"""How dagster-celery behaves on a real Redis broker with run storage in a real PostgreSQL.

The toy job (tests/distributed/toy_celery_job.py) has ``prepare`` (no queue tag: the default
``dagster`` queue) and ``render`` (tag ``dagster-celery/queue: gpu``); its outputs go to the moto
S3 server. Workers are real ``dagster-celery worker start`` processes (prefork, concurrency 1);
each run is orchestrated by ``execute_job`` in a subprocess so the test can bound it, interrupt
it and never hang.

What these tests pin down:

a. The event log names the worker of every step: an ENGINE_EVENT "Executing steps STEP in celery
   worker" whose metadata "Celery worker" is the worker's node name (``NAME@HOST``), with the
   step key on the event (``celery_workers_by_step`` in tests/services.py reads it).
b. A step tagged ``dagster-celery/queue: gpu`` runs on the ``-q gpu`` worker, the other one on
   the default-queue worker.
c. Module-level state survives between tasks in one worker process: the second run's render
   finds the "model cache" its first run filled, in the same pool process.
d. A worker SIGKILLed mid-step (default celery settings: the task is acked when it starts) loses
   the task for good: the broker holds nothing, the run stays STARTED forever, even after the
   worker is back. Interrupting the orchestrator (SIGTERM) revokes and fails the run at once,
   and a re-execution from failure runs only the lost step. With ``task_acks_late`` the broker
   redelivers the task after ``visibility_timeout`` to the restarted worker and the run
   finishes by itself. Only the pool process dying (OOM killer) with default settings fails the
   run within seconds (WorkerLostError); with acks_late + reject_on_worker_lost it is requeued
   and re-run at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.services import (
    CeleryWorker,
    RunningService,
    S3Service,
    ServiceUnavailable,
    celery_workers_by_step,
    start_celery_worker,
    write_dagster_home,
)

dg = pytest.importorskip("dagster")
pytest.importorskip("dagster_celery")
pytest.importorskip("dagster_aws")
redis_lib = pytest.importorskip("redis")

from dagster import DagsterEventType, DagsterRunStatus  # noqa: E402

from tests.distributed.toy_celery_job import GPU_QUEUE, toy_run_config  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ORCHESTRATE = "from tests.distributed.toy_celery_job import main; main()"
RUN_TIMEOUT = 90  # seconds for one whole run on a busy 2-core machine
HANG_OBSERVATION = 8  # seconds a run is watched to show that nothing happens

# Redelivery of a task whose worker died: acks_late keeps the message in Redis' "unacked" set
# until the task ends; a consumer puts it back on its queue once it is older than
# visibility_timeout. kombu sweeps every unacked_restore_interval * unacked_restore_throttle
# seconds (10 * 10 by default): 1 * 1 makes the sweep every second.
VISIBILITY_TIMEOUT = 10
ACKS_LATE_CONFIG: dict[str, Any] = {
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "broker_transport_options": {
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
        # dagster-celery's defaults, which a broker_transport_options setting replaces
        "max_attempts": 4,
        "interval_start": 0,
        "interval_step": 0.2,
        "interval_max": 0.5,
    },
}


pytestmark = pytest.mark.slow  # minutes: a celery stack and runs on it


@dataclass
class CeleryStack:
    redis: RunningService
    s3: S3Service
    home: Path
    instance: Any  # DagsterInstance on Postgres
    default_worker: CeleryWorker
    tmp_dir: Path

    def gpu_worker(self, name: str, config_source: dict[str, Any] | None = None) -> CeleryWorker:
        return start_celery_worker(
            self.tmp_dir,
            broker_url=self.redis.url,
            dagster_home=self.home,
            name=name,
            queues=[GPU_QUEUE],
            config_source=config_source,
            cwd=PROJECT_ROOT,
        )

    def run_config(self, sleep_seconds: float = 0.0) -> dict[str, Any]:
        return toy_run_config(
            self.redis.url, self.s3.url, self.s3.bucket, sleep_seconds=sleep_seconds
        )

    def orchestrate(
        self, run_config: dict[str, Any], label: str, from_failure: str | None = None
    ) -> Orchestrator:
        """Start ``execute_job`` of the toy job in a subprocess, its run tagged ``label``."""
        command = [sys.executable, "-c", ORCHESTRATE, "--run-config", json.dumps(run_config)]
        command += ["--tags", json.dumps({"toy/label": label})]
        if from_failure:
            command += ["--from-failure", from_failure]
        log_path = self.tmp_dir / f"orchestrator-{label}.log"
        env = {**os.environ, "DAGSTER_HOME": str(self.home), "PYTHONPATH": str(PROJECT_ROOT)}
        with log_path.open("w") as log:
            process = subprocess.Popen(
                command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        return Orchestrator(self, label, process, log_path)


@dataclass
class Orchestrator:
    stack: CeleryStack
    label: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def run_id(self, timeout: float = RUN_TIMEOUT) -> str:
        runs: list[Any] = []

        def created() -> bool:
            runs[:] = self.stack.instance.get_runs(
                filters=dg.RunsFilter(tags={"toy/label": self.label})
            )
            return bool(runs)

        wait_for(created, timeout, f"run {self.label} created", self)
        return runs[0].run_id

    def status(self) -> DagsterRunStatus:
        return self.stack.instance.get_run_by_id(self.run_id()).status

    def finish(self, timeout: float = RUN_TIMEOUT) -> DagsterRunStatus:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"run {self.label} did not finish in {timeout} s:\n{self.log()}")
        return self.status()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, orchestrator: Orchestrator | None
) -> float:
    """Poll until ``predicate()``; return the seconds it took, fail the test on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            log = orchestrator.log() if orchestrator else ""
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{log}")
        time.sleep(0.2)
    return time.monotonic() - start


def events(instance: Any, run_id: str, event_type: DagsterEventType) -> list[Any]:
    records = instance.get_records_for_run(run_id, of_type=event_type, limit=10_000).records
    return [record.event_log_entry.dagster_event for record in records]


def step_starts(instance: Any, run_id: str, step_key: str) -> int:
    starts = events(instance, run_id, DagsterEventType.STEP_START)
    return sum(event.step_key == step_key for event in starts)


def output_metadata(instance: Any, run_id: str, step_key: str) -> dict[str, Any]:
    for event in events(instance, run_id, DagsterEventType.STEP_OUTPUT):
        if event.step_key == step_key:
            return {key: value.value for key, value in event.step_output_data.metadata.items()}
    raise AssertionError(f"no output of {step_key} in run {run_id}")


def s3_keys(s3: S3Service, prefix: str) -> list[str]:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3.url,
        aws_access_key_id=s3.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3.env["AWS_SECRET_ACCESS_KEY"],
        region_name=s3.env["AWS_DEFAULT_REGION"],
    )
    listing = client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def executing_times(instance: Any, run_id: str, step_key: str) -> list[float]:
    """Timestamps of the "Executing steps STEP in celery worker" events: when a worker began."""
    records = instance.get_records_for_run(
        run_id, of_type=DagsterEventType.ENGINE_EVENT, limit=10_000
    ).records
    return [
        record.event_log_entry.timestamp
        for record in records
        if record.event_log_entry.dagster_event.step_key == step_key
        and "in celery worker" in (record.event_log_entry.dagster_event.message or "")
    ]


def queued_or_unacked(redis_url: str, queue: str) -> int:
    """Messages Redis holds for ``queue`` (all priority lists) plus unacked ones (any queue)."""
    client = redis_lib.Redis.from_url(redis_url)
    try:
        waiting = sum(client.llen(key) for key in client.scan_iter(f"{queue}*"))
        return waiting + client.hlen("unacked")
    finally:
        client.close()


@pytest.fixture(scope="module")
def stack(
    redis_service: RunningService,
    postgres_service: RunningService,
    s3_service: S3Service,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[CeleryStack]:
    tmp_dir = tmp_path_factory.mktemp("celery")
    home = write_dagster_home(tmp_dir / "dagster_home", postgres_service)
    # the instance is created here first, so the Postgres tables exist before any worker starts
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        default_worker = start_celery_worker(
            tmp_dir,
            broker_url=redis_service.url,
            dagster_home=home,
            name=f"default-{uuid.uuid4().hex[:4]}",
            cwd=PROJECT_ROOT,
        )
    except ServiceUnavailable as exc:
        instance.dispose()
        pytest.skip(str(exc))
    try:
        yield CeleryStack(redis_service, s3_service, home, instance, default_worker, tmp_dir)
    finally:
        default_worker.stop()
        instance.dispose()


def test_queue_routing_worker_names_and_warm_cache(stack: CeleryStack) -> None:
    """a, b, c: the event log names each step's worker; the gpu-tagged op ran on the gpu worker;
    a module-level cache filled by one run is still there for the next run's step."""
    gpu = stack.gpu_worker("gpu-abc")
    try:
        run_ids = []
        for label in ("abc-1", "abc-2"):
            orchestrator = stack.orchestrate(stack.run_config(), f"{label}-{uuid.uuid4().hex[:6]}")
            assert orchestrator.finish() == DagsterRunStatus.SUCCESS, orchestrator.log()
            run_ids.append(orchestrator.run_id())
        gpu_pool = gpu.pool_pids()
        default_pool = stack.default_worker.pool_pids()
    finally:
        gpu.stop()

    for run_id in run_ids:
        # a, b: which worker executed each step, from the event log alone
        assert celery_workers_by_step(stack.instance, run_id) == {
            "prepare": [stack.default_worker.hostname],
            "render": [gpu.hostname],
        }
        submitted = [
            event.message
            for event in events(stack.instance, run_id, DagsterEventType.ENGINE_EVENT)
            if event.message.startswith("Submitting celery task")
        ]
        assert submitted == [
            'Submitting celery task for step "prepare" to queue "dagster".',
            'Submitting celery task for step "render" to queue "gpu".',
        ]
        # the outputs went to S3 (s3_pickle_io_manager: PREFIX/storage/RUN_ID/STEP/OUTPUT)
        assert s3_keys(stack.s3, f"toy/storage/{run_id}/") == [
            f"toy/storage/{run_id}/prepare/result",
            f"toy/storage/{run_id}/render/result",
        ]

    # c: one pool process ran both renders, and the second found the first one's cache
    first, second = (output_metadata(stack.instance, run_id, "render") for run_id in run_ids)
    assert first["pid"] == second["pid"] == first["cache_loaded_by_pid"]
    assert first["pid"] in gpu_pool
    assert (first["cache_warm"], second["cache_warm"]) == (False, True)
    assert second["steps_in_process"] == first["steps_in_process"] + 1
    prepared = output_metadata(stack.instance, run_ids[1], "prepare")
    assert prepared["pid"] in default_pool
    assert prepared["pid"] != first["pid"]


def test_killed_worker_loses_the_task_and_the_run_hangs_until_interrupted(
    stack: CeleryStack,
) -> None:
    """d, default settings: SIGKILL of the gpu worker mid-step. The task was acked when it
    started, so the broker holds nothing, the run stays STARTED (also after the worker is back);
    SIGTERM to the orchestrator fails it at once; re-execution from failure runs only render."""
    gpu = stack.gpu_worker("gpu-kill-1")
    restarted: CeleryWorker | None = None
    orchestrator = stack.orchestrate(
        stack.run_config(sleep_seconds=60), f"kill-{uuid.uuid4().hex[:6]}"
    )
    try:
        run_id = orchestrator.run_id()
        wait_for(
            lambda: step_starts(stack.instance, run_id, "render") == 1,
            RUN_TIMEOUT,
            "render to start",
            orchestrator,
        )
        gpu.kill()
        assert queued_or_unacked(stack.redis.url, GPU_QUEUE) == 0  # the task is gone for good
        restarted = stack.gpu_worker("gpu-kill-2")
        time.sleep(HANG_OBSERVATION)
        assert orchestrator.process.poll() is None
        assert orchestrator.status() == DagsterRunStatus.STARTED
        assert step_starts(stack.instance, run_id, "render") == 1  # never redelivered

        orchestrator.process.send_signal(signal.SIGTERM)
        took = wait_for(
            lambda: orchestrator.status() == DagsterRunStatus.FAILURE,
            30,
            "the interrupted run to fail",
            orchestrator,
        )
        assert took < 10
        print(f"default acks: run failed {took:.1f} s after SIGTERM to the orchestrator")
        assert orchestrator.finish() == DagsterRunStatus.FAILURE
        messages = [
            e.message for e in events(stack.instance, run_id, DagsterEventType.ENGINE_EVENT)
        ]
        assert 'celery task for running step "render" was revoked.' in messages

        retry = stack.orchestrate(stack.run_config(), f"kill-retry-{uuid.uuid4().hex[:6]}", run_id)
        assert retry.finish() == DagsterRunStatus.SUCCESS, retry.log()
        retry_run = stack.instance.get_run_by_id(retry.run_id())
        assert retry_run.parent_run_id == run_id
        # only the lost step ran again, on the restarted worker; prepare's output was reused
        assert celery_workers_by_step(stack.instance, retry.run_id()) == {
            "render": [restarted.hostname]
        }
    finally:
        orchestrator.stop()
        gpu.stop()
        if restarted is not None:
            restarted.stop()


def test_killed_pool_process_fails_the_run_within_seconds(stack: CeleryStack) -> None:
    """d, default settings: only the pool process dies (what the OOM killer does); the worker's
    main process reports WorkerLostError as the task's result and the run fails."""
    gpu = stack.gpu_worker("gpu-oom")
    orchestrator = stack.orchestrate(
        stack.run_config(sleep_seconds=60), f"oom-{uuid.uuid4().hex[:6]}"
    )
    try:
        run_id = orchestrator.run_id()
        wait_for(
            lambda: step_starts(stack.instance, run_id, "render") == 1,
            RUN_TIMEOUT,
            "render to start",
            orchestrator,
        )
        (pool_pid,) = gpu.pool_pids()
        os.kill(pool_pid, signal.SIGKILL)
        took = wait_for(
            lambda: orchestrator.status() == DagsterRunStatus.FAILURE,
            30,
            "the run to fail",
            orchestrator,
        )
        assert took < 15
        print(f"pool process killed: run failed {took:.1f} s later")
        failure = events(stack.instance, run_id, DagsterEventType.RUN_FAILURE)[0]
        assert "WorkerLostError" in str(failure.event_specific_data.error)
        assert orchestrator.finish() == DagsterRunStatus.FAILURE
    finally:
        orchestrator.stop()
        gpu.stop()


def test_acks_late_redelivers_the_task_to_the_restarted_worker(stack: CeleryStack) -> None:
    """d, task_acks_late + a short visibility_timeout: the killed worker's task stays in Redis'
    unacked set and goes back to the gpu queue once it is older than visibility_timeout; the
    restarted worker runs the step again and the run succeeds with no one's help."""
    gpu = stack.gpu_worker("gpu-late-1", ACKS_LATE_CONFIG)
    restarted: CeleryWorker | None = None
    orchestrator = stack.orchestrate(
        stack.run_config(sleep_seconds=3), f"late-{uuid.uuid4().hex[:6]}"
    )
    try:
        run_id = orchestrator.run_id()
        wait_for(
            lambda: step_starts(stack.instance, run_id, "render") == 1,
            RUN_TIMEOUT,
            "render to start",
            orchestrator,
        )
        gpu.kill()
        killed_at = time.monotonic()
        assert queued_or_unacked(stack.redis.url, GPU_QUEUE) == 1  # kept, unacked
        restarted = stack.gpu_worker("gpu-late-2", ACKS_LATE_CONFIG)
        wait_for(
            lambda: step_starts(stack.instance, run_id, "render") == 2,
            VISIBILITY_TIMEOUT + 90,  # the restarted worker imports for a while on a busy machine
            "render to be redelivered",
            orchestrator,
        )
        redelivered_after_kill = time.monotonic() - killed_at
        assert orchestrator.finish() == DagsterRunStatus.SUCCESS, orchestrator.log()
        # A third delivery can follow on a busy machine: the redelivered task itself ran past
        # the visibility timeout, which is what acks_late with a visibility timeout does.
        first, second, *_ = executing_times(stack.instance, run_id, "render")
        # driven by the timeout, not an immediate requeue: the second delivery came about
        # visibility_timeout after the first (measured: 9-10.5 s for 10 s)
        assert second - first > VISIBILITY_TIMEOUT / 2
        print(
            f"acks_late: render redelivered {redelivered_after_kill:.1f} s after the kill, "
            f"{second - first:.1f} s after its first start; run succeeded "
            f"{time.monotonic() - killed_at:.1f} s after the kill"
        )
        workers = celery_workers_by_step(stack.instance, run_id)["render"]
        assert workers[:2] == [gpu.hostname, restarted.hostname]
        assert set(workers[2:]) <= {restarted.hostname}
    finally:
        orchestrator.stop()
        gpu.stop()
        if restarted is not None:
            restarted.stop()
