"""The project started the way a user starts it (`make ui`: webserver, daemon, code server), on
temporary folders, with ways to drive it (drop CSVs, GraphQL backfills, the CLIs) and to look at
it (runs, backfills, step metadata). The user-flow tests and ``benchmarks/backfill.py`` use it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BUSY = (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED)
DONE_BACKFILL = ("COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED")
PER_BACKEND_ASSETS = ("images", "quality", "keepers", "clips", "video_quality")
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
LAUNCH_BACKFILL = """
mutation LaunchBackfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on UnauthorizedError { message }
  }
}
"""
LAUNCH_RUN = """
mutation LaunchRun($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
  }
}
"""


class ProjectTimeout(AssertionError):
    """Something the project should have done did not happen in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def partitions_of(run: dg.DagsterRun) -> str:
    """A run's partition key, or "start..end" for a run over a range."""
    if RANGE_START in run.tags:
        return f"{run.tags[RANGE_START]}..{run.tags[RANGE_END]}"
    return run.tags.get("dagster/partition", "")


@dataclass
class RunningProject:
    """`make ui` on temporary folders, and ways to drive and look at it."""

    port: int
    home: Path
    prompts: Path
    storage: Path
    log: Path
    env: dict[str, str]
    _instance: dg.DagsterInstance | None = field(default=None, repr=False)

    def instance(self) -> AbstractContextManager[dg.DagsterInstance]:
        """The project's Dagster instance (the same SQLite files the daemon writes), opened
        once: the stages poll it every second, and opening one costs ~0.13 s of CPU."""
        if self._instance is None:
            self._instance = dg.DagsterInstance.from_config(str(self.home))
        return nullcontext(self._instance)

    def close(self) -> None:
        """Let go of the instance."""
        if self._instance is not None:
            self._instance.dispose()
            self._instance = None

    def gallery(self, prompt_set: str) -> Path:
        """The set's HTML contact sheet (it exists once the set's comparison ran)."""
        return self.storage / "reports" / prompt_set / "gallery.html"

    def runs(self) -> list[dg.DagsterRun]:
        """Every run so far, newest first."""
        with self.instance() as instance:
            return [record.dagster_run for record in instance.get_run_records()]

    def idle(self) -> bool:
        """No run queued or in progress."""
        return not [run for run in self.runs() if run.status in BUSY]

    def wait_for(self, what: str, done: Callable[[], bool], timeout: float = 420) -> float:
        """Wait until ``done()``; returns the seconds it took, raises ProjectTimeout."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if done():
                return time.monotonic() - started
            time.sleep(1)
        tail = self.log.read_text(errors="replace")[-6000:]
        raise ProjectTimeout(
            f"timed out waiting for {what}; runs: {self.run_summary()}\n--- log ---\n{tail}"
        )

    def run_summary(self) -> str:
        """The runs so far as (job, status, partitions), or why they cannot be read.

        A project that never started (the webserver never answered) may have no instance in
        its DAGSTER_HOME yet: the summary says so instead of hiding the `make ui` log behind
        an instance error."""
        try:
            return str([(r.job_name, r.status.value, partitions_of(r)) for r in self.runs()])
        except Exception as exc:
            return f"unreadable ({type(exc).__name__}: {exc})"

    def graphql(self, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        """One GraphQL call through the dagster-graphql client."""
        from dagster_graphql import DagsterGraphQLClient

        client = DagsterGraphQLClient("127.0.0.1", port_number=self.port)
        return client._execute(query, variables)  # the client has no backfill method

    def launch_backfill(
        self, partition_keys: Sequence[str], assets: Sequence[str] = PER_BACKEND_ASSETS
    ) -> str:
        """A backfill of ``assets`` over ``partition_keys``, as the UI submits it."""
        answer = self.graphql(
            LAUNCH_BACKFILL,
            {
                "params": {
                    "assetSelection": [{"path": [name]} for name in assets],
                    "partitionNames": list(partition_keys),
                }
            },
        )["launchPartitionBackfill"]
        if answer["__typename"] != "LaunchBackfillSuccess":
            raise AssertionError(f"backfill refused: {answer}")
        return answer["backfillId"]

    def launch_run(self, job: str, partition_key: str) -> str:
        """One run of ``job`` for one partition, as the UI's launchpad submits it."""
        selector = {
            "repositoryLocationName": "imagegen_pipeline",
            "repositoryName": "__repository__",
            "jobName": job,
        }
        tags = [{"key": "dagster/partition", "value": partition_key}]
        if "|" in partition_key:
            backend, prompt_set = partition_key.split("|")
            tags += [
                {"key": "dagster/partition/backend", "value": backend},
                {"key": "dagster/partition/prompt_set", "value": prompt_set},
            ]
        answer = self.graphql(
            LAUNCH_RUN,
            {"params": {"selector": selector, "executionMetadata": {"tags": tags}}},
        )["launchRun"]
        if answer["__typename"] != "LaunchRunSuccess":
            raise AssertionError(f"run refused: {answer}")
        return answer["run"]["runId"]

    def backfill_runs(self, backfill_id: str) -> list[dg.DagsterRun]:
        """The runs a backfill created."""
        with self.instance() as instance:
            records = instance.get_run_records(
                dg.RunsFilter(tags={"dagster/backfill": backfill_id})
            )
        return [record.dagster_run for record in records]

    def backfill_status(self, backfill_id: str) -> str:
        """The backfill's status name (REQUESTED, COMPLETED_SUCCESS, ...)."""
        with self.instance() as instance:
            return instance.get_backfill(backfill_id).status.value

    def wait_for_backfill(self, backfill_id: str, timeout: float = 600) -> float:
        """Wait until the daemon marks the backfill done; returns the seconds it took."""
        return self.wait_for(
            f"backfill {backfill_id}",
            lambda: self.backfill_status(backfill_id) in DONE_BACKFILL,
            timeout,
        )

    def set_sensor(self, name: str, running: bool) -> None:
        """Start or stop a sensor as a user does (`dagster sensor start|stop`), until it sticks.

        The daemon writes a sensor's state back after each tick; a stop that lands during a
        tick can be overwritten, so the state is read back over a few ticks and set again."""
        wanted, action = ("RUNNING", "start") if running else ("STOPPED", "stop")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            result = self.cli("dagster", "sensor", action, name, "-w", "workspace.yaml")
            if result.returncode != 0 and "already" not in result.stdout + result.stderr:
                raise AssertionError(result.stdout + result.stderr)
            time.sleep(8)  # a few ticks of the daemon
            if self.sensor_status(name) == wanted:
                return
        raise ProjectTimeout(f"sensor {name} did not stay {wanted}")

    def sensor_status(self, name: str) -> str:
        """RUNNING or STOPPED, as the daemon will act on it."""
        with self.instance() as instance:
            for state in instance.all_instigator_state():
                if state.instigator_name == name:
                    return "STOPPED" if state.status.value == "STOPPED" else "RUNNING"
        return "RUNNING"  # never touched: its default status, running

    def cli(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        """A command of the project's virtual environment, from the project folder."""
        return subprocess.run(
            [str(PROJECT_ROOT / ".venv" / "bin" / program), *args],
            cwd=PROJECT_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
        )


@contextmanager
def running_project(root: Path, **variables: str) -> Iterator[RunningProject]:
    """`make ui` on folders under ``root`` (prompts, storage, Dagster home), models on "auto",
    plus ``variables`` (e.g. IMAGEGEN_SENSOR_INTERVAL_SECONDS); stopped on exit."""
    port = free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(root / "dagster_home"),
        "IMAGEGEN_PROMPTS_DIR": str(root / "prompts"),
        "IMAGEGEN_STORAGE": str(root / "storage"),
        "HF_HUB_OFFLINE": "1",
        **variables,
    }
    for variable in [v for v in env if v.startswith("IMAGEGEN_") and v.endswith("_MODEL")]:
        if variable not in variables:
            del env[variable]  # "auto": the choice `make demo` makes
    (root / "prompts").mkdir(parents=True, exist_ok=True)
    log = root / "make-ui.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            ["make", "-C", str(PROJECT_ROOT), "ui", f"PORT={port}"],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    project = RunningProject(
        port, Path(env["DAGSTER_HOME"]), root / "prompts", root / "storage", log, env
    )

    def answering() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"make ui ended: {log.read_text()[-4000:]}")
        try:
            project.graphql("{ version }", {})
        except Exception:  # not listening yet
            return False
        return True

    try:
        project.wait_for("the webserver", answering, timeout=240)
        yield project
    finally:
        project.close()
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen, timeout: float = 15) -> None:
    """Stop ``process`` and everything it started, as Ctrl-C does, then by force.

    make exits at once, but `dagster dev` takes its webserver, daemon and code servers down
    slowly; waiting for make alone left them running (and ticking sensors) after a test. A test
    has checked what it needed by then, so the grace is short (after the UI's partitions page
    was rendered, Ctrl-C once took the full minute)."""
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            process.poll()  # reap make, or it lingers in the group as a zombie
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)
