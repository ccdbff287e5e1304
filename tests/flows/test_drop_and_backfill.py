"""Dropping CSVs into the prompts folder, the README's CLI, a UI (GraphQL) backfill over every set,
and the UI's pages: what a user looks at after each (runs, step metadata in Parquet, galleries).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pytest

from imagegen_pipeline.run_metadata import load_run_metadata
from tests.conftest import EXAMPLE_CSV, SECOND_CSV, chromium_screenshot, needs_chromium
from tests.flows.conftest import LOCAL
from tests.support.running_project import RunningProject, partitions_of

# A stage waits for the real daemon, whose runs share two cores: more than the default 600 s.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def test_make_ui_starts_without_a_misleading_warning(project: RunningProject):
    text = project.log.read_text()
    assert "Serving dagster-webserver" in text
    assert "will not be used to configure Dagster" not in text


def test_csvs_dropped_together_go_through_the_daemon(project: RunningProject):
    # Three files within one sensor tick, and a bad one. (The schedule-and-review flow drops
    # its files one after another.)
    (project.prompts / "alpha.csv").write_text(EXAMPLE_CSV)
    (project.prompts / "beta.csv").write_text(SECOND_CSV)
    (project.prompts / "gamma.csv").write_text(SECOND_CSV.replace("ramen", "noodles"))
    (project.prompts / "broken.csv").write_text("text\nhello\n")
    project.wait_for(
        "every set's gallery",
        lambda: all(project.gallery(s).exists() for s in ("alpha", "beta", "gamma")),
    )
    project.wait_for("every run to end", project.idle)

    runs = project.runs()
    failed = [run for run in runs if run.status == dg.DagsterRunStatus.FAILURE]
    assert [(run.job_name, partitions_of(run)) for run in failed] == [("prepare_prompts", "broken")]
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

    # The sets dropped together were generated together: one run (one model load) per backend,
    # spanning them all; none was lost to another landing in the same tick.
    generate = [run for run in runs if run.job_name == "generate_images"]
    spans = sorted(partitions_of(run) for run in generate)
    assert spans == [f"{b}|alpha..{b}|gamma" for b in LOCAL]
    steps = load_run_metadata(project.storage, "steps")
    images = steps[(steps.asset == "images") & (steps.requested > 0)]  # broken plans nothing
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
        "dagster",
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
    # It made nothing: its step row counts the 4 images it found, with no row for each.
    steps = load_run_metadata(project.storage, "steps", prompt_set="alpha", backend="flux_schnell")
    latest = steps.sort_values("finished_at").iloc[-1]
    assert (latest["asset"], latest["generated"], latest["skipped_existing"]) == ("images", 0, 4)
    images = load_run_metadata(project.storage, "images", prompt_set="alpha", history=True)
    assert latest["run_id"] not in set(images["run_id"])


def test_a_graphql_backfill_over_every_set_loads_each_model_once(project: RunningProject):
    # The images and clips are gone (a disk was cleaned): the backfill must make them again.
    shutil.rmtree(project.storage / "images")
    shutil.rmtree(project.storage / "clips")
    # Every partition of the local backends, as "select all" in the UI does: broken's included
    # (its CSV failed, so it has no prompts and plans nothing).
    with project.instance() as instance:
        sets = instance.get_dynamic_partitions("prompt_sets")
    assert sorted(sets) == ["alpha", "beta", "broken", "gamma"]
    keys = [f"{backend}|{s}" for backend in LOCAL for s in sets]

    backfill = project.launch_backfill(keys)
    project.wait_for_backfill(backfill)
    runs = project.backfill_runs(backfill)

    assert project.backfill_status(backfill) == "COMPLETED_SUCCESS"
    assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)
    assert len(runs) <= len(LOCAL)  # one run per backend (or one for both): never per set
    run_ids = {run.run_id for run in runs}
    steps = load_run_metadata(project.storage, "steps")
    mine = steps[steps.run_id.isin(run_ids)]
    generated = mine[mine.asset == "images"]
    assert sorted(generated["prompt_set"] + "|" + generated["backend"]) == sorted(
        f"{s}|{b}" for b in LOCAL for s in sets
    )
    assert generated["generated"].sum() == 2 * (4 + 2 + 2) - 1  # the owl is flux-only
    assert generated.groupby("backend")["model_loads"].sum().to_dict() == dict.fromkeys(LOCAL, 1)
    clips = mine[mine.asset == "clips"]
    # SVD once per run, warm for every partition of it.
    assert clips.groupby("run_id")["model_loads"].sum().to_dict() == dict.fromkeys(run_ids, 1)

    # The same backfill again: nothing to do, no model loaded, fast.
    again = project.launch_backfill(keys)
    seconds = project.wait_for_backfill(again)
    steps = load_run_metadata(project.storage, "steps")
    second = steps[steps.run_id.isin({run.run_id for run in project.backfill_runs(again)})]
    assert len(second) and second["generated"].sum() == 0 and second["model_loads"].sum() == 0
    # The daemon looks at backfills every 30 s: two looks, plus the runs' own start-up.
    assert seconds < 150


@needs_chromium
def test_the_images_partitions_page_renders(project: RunningProject, tmp_path: Path):
    screenshot = chromium_screenshot(
        f"http://127.0.0.1:{project.port}/assets/images?view=partitions",
        "images-partitions.png",
        tmp_path / "chromium",
        size=(1400, 1000),
        wait_ms=10000,
    )
    assert screenshot.stat().st_size > 20_000
