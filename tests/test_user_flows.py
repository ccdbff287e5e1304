"""The project the way its users run it: `make ui` (webserver, daemon, sensors, schedule), CSVs
dropped one after another, a GraphQL backfill, the CLI forms the README shows.

One `make ui` serves the whole module (it takes a while to start); the tests run in order,
each a stage of one day of use. Everything is checked through what a user looks at: the runs,
the step metadata in Parquet, the galleries, the UI.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster_graphql import DagsterGraphQLClient

from imagegen_pipeline.run_metadata import load_run_metadata
from tests.conftest import EXAMPLE_CSV, PROJECT_ROOT, SECOND_CSV
from tests.services import free_port

pytestmark = pytest.mark.slow

LOCAL = ("flux_schnell", "sdxl_turbo")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
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


@dataclass
class RunningProject:
    """`make ui` on temporary folders, and ways to look at it."""

    port: int
    home: Path
    prompts: Path
    storage: Path
    log: Path
    env: dict[str, str]

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(self.home))

    def runs(self) -> list[dg.DagsterRun]:
        with self.instance() as instance:
            return [record.dagster_run for record in instance.get_run_records()]

    def wait_for(self, what: str, done: Callable[[], bool], timeout: float = 420) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done():
                return
            time.sleep(2)
        tail = self.log.read_text(errors="replace")[-6000:]
        summary = [(r.job_name, r.status.value, partitions(r)) for r in self.runs()]
        pytest.fail(f"timed out waiting for {what}; runs: {summary}\n--- log tail ---\n{tail}")

    def gallery(self, prompt_set: str) -> Path:
        return self.storage / "reports" / prompt_set / "gallery.html"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(PROJECT_ROOT / ".venv" / "bin" / "dagster"), *args],
            cwd=PROJECT_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
        )


def partitions(run: dg.DagsterRun) -> str:
    tags = run.tags
    if "dagster/asset_partition_range_start" in tags:
        start, end = (
            tags["dagster/asset_partition_range_start"],
            tags["dagster/asset_partition_range_end"],
        )
        return f"{start}..{end}"
    return tags.get("dagster/partition", "")


def finished(project: RunningProject) -> bool:
    """No run queued or in progress."""
    busy = {dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED}
    return not [run for run in project.runs() if run.status in busy]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProject]:
    """`make ui` as a user starts it, on temporary folders, with the models on "auto"."""
    root = tmp_path_factory.mktemp("project")
    port = free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(root / "dagster_home"),
        "IMAGEGEN_PROMPTS_DIR": str(root / "prompts"),
        "IMAGEGEN_STORAGE": str(root / "storage"),
        "IMAGEGEN_SENSOR_INTERVAL_SECONDS": "3",
        "IMAGEGEN_BULK_CRON": "* * * * *",
        "HF_HUB_OFFLINE": "1",
    }
    for variable in [v for v in env if v.endswith("_MODEL") and v.startswith("IMAGEGEN_")]:
        del env[variable]  # "auto": the same choice `make demo` makes
    (root / "prompts").mkdir()
    log = root / "make-ui.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [
                "make",
                "-C",
                str(PROJECT_ROOT),
                "ui",
                f"PORT={port}",
                f"DAGSTER_HOME={env['DAGSTER_HOME']}",
            ],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = RunningProject(
        port, Path(env["DAGSTER_HOME"]), root / "prompts", root / "storage", log, env
    )
    try:
        client = DagsterGraphQLClient("127.0.0.1", port_number=port)

        def answering() -> bool:
            assert process.poll() is None, log.read_text()
            try:
                client._execute("{ version }")  # the public client has no backfill call either
            except Exception:
                return False
            return True

        running.wait_for("the webserver", answering, timeout=180)
        yield running
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_make_ui_starts_without_a_misleading_warning(project: RunningProject):
    text = project.log.read_text()
    assert "Serving dagster-webserver" in text
    assert "will not be used to configure Dagster" not in text


def test_csvs_dropped_one_after_another_go_through_the_daemon(project: RunningProject):
    (project.prompts / "alpha.csv").write_text(EXAMPLE_CSV)
    project.wait_for("alpha's gallery", lambda: project.gallery("alpha").exists())

    # Two files within one sensor tick, and a bad one.
    (project.prompts / "beta.csv").write_text(SECOND_CSV)
    (project.prompts / "gamma.csv").write_text(SECOND_CSV.replace("ramen", "noodles"))
    (project.prompts / "broken.csv").write_text("text\nhello\n")
    project.wait_for(
        "beta's and gamma's galleries",
        lambda: project.gallery("beta").exists() and project.gallery("gamma").exists(),
    )
    project.wait_for("every run to end", lambda: finished(project))

    runs = project.runs()
    failed = [run for run in runs if run.status == dg.DagsterRunStatus.FAILURE]
    assert [(run.job_name, partitions(run)) for run in failed] == [("prepare_prompts", "broken")]
    with project.instance() as instance:
        failure = next(
            event
            for event in instance.all_logs(failed[0].run_id)
            if event.dagster_event and event.dagster_event.is_step_failure
        )
    assert (
        "broken.csv: missing required column 'prompt'"
        in failure.dagster_event.step_failure_data.error.message
    )

    # Every set was generated once per backend, none lost to another landing in the same tick;
    # sets enhanced within one tick share a run (one per backend) — how many did depends on timing.
    generate = [run for run in runs if run.job_name == "generate_images"]
    assert len(generate) <= 3 * len(LOCAL)
    steps = load_run_metadata(project.storage, "steps")
    images = steps[steps.asset == "images"]
    made = sorted(images["prompt_set"] + "|" + images["backend"])
    assert made == sorted(f"{s}|{b}" for s in ("alpha", "beta", "gamma") for b in LOCAL)
    assert set(images["run_id"]) == {run.run_id for run in generate}
    assert images.groupby("run_id")["model_loads"].sum().eq(1).all()  # once per run
    for prompt_set, prompts in (("alpha", 3), ("beta", 2), ("gamma", 2)):
        page = project.gallery(prompt_set).read_text()
        assert page.count('<section class="prompt"') == prompts
        assert all(backend in page for backend in LOCAL)
    # The tiny stand-ins were chosen (no real weights here) and said so.
    assert "TINY RANDOM-WEIGHT" in project.log.read_text()


def test_the_readme_cli_materializes_a_partition(project: RunningProject):
    result = project.cli(
        "asset",
        "materialize",
        "-m",
        "imagegen_pipeline.definitions",
        "--select",
        "images",
        "--partition",
        "flux_schnell|alpha",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    images = load_run_metadata(
        project.storage, "images", prompt_set="alpha", backend="flux_schnell"
    )
    latest = images[images.run_id == images.sort_values("finished_at").run_id.iloc[-1]]
    assert set(latest["status"]) == {"skipped_existing"} and len(latest) == 4


def launch_backfill(project: RunningProject, partition_names: list[str]) -> str:
    client = DagsterGraphQLClient("127.0.0.1", port_number=project.port)
    answer: dict[str, Any] = client._execute(
        LAUNCH_BACKFILL,
        {
            "params": {
                "assetSelection": [
                    {"path": [name]} for name in ("images", "quality", "clips", "video_quality")
                ],
                "partitionNames": partition_names,
                "title": "every prompt set, again",
            }
        },
    )
    result = answer["launchPartitionBackfill"]
    assert result["__typename"] == "LaunchBackfillSuccess", result
    return result["backfillId"]


def wait_for_backfill(project: RunningProject, backfill_id: str) -> list[dg.DagsterRun]:
    def done() -> bool:
        with project.instance() as instance:
            backfill = instance.get_backfill(backfill_id)
            return backfill.status.value in (
                "COMPLETED",
                "COMPLETED_SUCCESS",
                "FAILED",
                "CANCELED",
                "COMPLETED_FAILED",
            )

    project.wait_for(f"backfill {backfill_id}", done, timeout=480)
    with project.instance() as instance:
        assert instance.get_backfill(backfill_id).status.value in ("COMPLETED", "COMPLETED_SUCCESS")
        records = instance.get_run_records(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
    return [record.dagster_run for record in records]


def test_a_graphql_backfill_over_every_set_loads_each_model_once(project: RunningProject):
    # The images and clips are gone (a disk was cleaned): the backfill must make them again.
    shutil.rmtree(project.storage / "images")
    shutil.rmtree(project.storage / "clips")
    keys = [f"{backend}|{s}" for backend in LOCAL for s in ("alpha", "beta", "gamma")]

    runs = wait_for_backfill(project, launch_backfill(project, keys))

    assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)
    assert len(runs) <= len(LOCAL)  # one run per backend (or one for both): never per set
    run_ids = {run.run_id for run in runs}
    steps = load_run_metadata(project.storage, "steps")
    mine = steps[steps.run_id.isin(run_ids)]
    generated = mine[mine.asset == "images"]
    assert sorted(generated["prompt_set"] + "|" + generated["backend"]) == sorted(
        f"{s}|{b}" for b in LOCAL for s in ("alpha", "beta", "gamma")
    )
    assert generated["generated"].sum() == 2 * (4 + 2 + 2) - 1  # the owl is flux-only
    assert generated.groupby("backend")["model_loads"].sum().to_dict() == dict.fromkeys(LOCAL, 1)
    clips = mine[mine.asset == "clips"]
    assert clips["model_loads"].sum() == 1  # SVD once, warm for the other backend's partitions

    # The same backfill again: nothing to do, no model loaded, fast.
    started = time.monotonic()
    again = wait_for_backfill(project, launch_backfill(project, keys))
    steps = load_run_metadata(project.storage, "steps")
    second = steps[steps.run_id.isin({run.run_id for run in again})]
    assert second["generated"].sum() == 0 and second["model_loads"].sum() == 0
    assert time.monotonic() - started < 180


def test_the_bulk_schedule_generates_what_is_missing(project: RunningProject):
    # A set prepared while automatic generation is off stays missing until the schedule runs.
    stop = project.cli("sensor", "stop", "generate_after_prompts_sensor", "-w", "workspace.yaml")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    (project.prompts / "delta.csv").write_text(SECOND_CSV.replace("ramen", "dumplings"))
    project.wait_for(
        "delta prepared",
        lambda: any(
            run.job_name == "prepare_prompts"
            and partitions(run) == "delta"
            and run.status == dg.DagsterRunStatus.SUCCESS
            for run in project.runs()
        ),
    )
    start = project.cli("schedule", "start", "bulk_generation_schedule", "-w", "workspace.yaml")
    assert start.returncode == 0, start.stdout + start.stderr
    project.wait_for(
        "the schedule's runs",
        lambda: (
            sum(
                run.tags.get("imagegen/reason", "").startswith("bulk")
                and run.status == dg.DagsterRunStatus.SUCCESS
                for run in project.runs()
            )
            == len(LOCAL)
        ),
        timeout=240,
    )
    bulk = [run for run in project.runs() if run.tags.get("imagegen/reason", "").startswith("bulk")]
    assert sorted(partitions(run) for run in bulk) == sorted(f"{b}|delta" for b in LOCAL)
    project.cli("schedule", "stop", "bulk_generation_schedule", "-w", "workspace.yaml")
    project.cli("sensor", "start", "generate_after_prompts_sensor", "-w", "workspace.yaml")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_the_images_partitions_page_renders(project: RunningProject, tmp_path: Path):
    artifacts = PROJECT_ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    screenshot = artifacts / "images-partitions.png"
    screenshot.unlink(missing_ok=True)
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--virtual-time-budget=20000",  # let the UI's scripts fetch and draw the partitions
            f"--screenshot={screenshot}",
            "--window-size=1400,1000",
            f"http://127.0.0.1:{project.port}/assets/images?view=partitions",
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    assert screenshot.stat().st_size > 20_000
