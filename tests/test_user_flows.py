"""The project the way its users run it: `make ui` (webserver, daemon, sensors, schedule), CSVs
dropped one after another, a GraphQL backfill, the CLI forms the README shows.

One `make ui` serves the whole module (it takes a while to start); the tests run in order,
each a stage of one day of use. Everything is checked through what a user looks at: the runs,
the step metadata in Parquet, the galleries, the UI.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from imagegen_pipeline.run_metadata import load_run_metadata
from imagegen_pipeline.storage import Storage
from tests.conftest import (
    CHROMIUM,
    EXAMPLE_CSV,
    SECOND_CSV,
    chromium_screenshot,
    needs_chromium,
)
from tests.support.running_project import (
    RunningProject,
    partitions_of,
    running_project,
)

# A stage waits for the real daemon, whose runs share two cores: more than the default 600 s.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

LOCAL = ("flux_schnell", "sdxl_turbo")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProject]:
    """`make ui` as a user starts it, on temporary folders, with the models on "auto"."""
    with running_project(
        tmp_path_factory.mktemp("project"),
        IMAGEGEN_SENSOR_INTERVAL_SECONDS="3",
        IMAGEGEN_BULK_CRON="* * * * *",
    ) as running:
        yield running


def gallery(project: RunningProject, prompt_set: str) -> Path:
    return project.storage / "reports" / prompt_set / "gallery.html"


def test_make_ui_starts_without_a_misleading_warning(project: RunningProject):
    text = project.log.read_text()
    assert "Serving dagster-webserver" in text
    assert "will not be used to configure Dagster" not in text


def test_csvs_dropped_one_after_another_go_through_the_daemon(project: RunningProject):
    (project.prompts / "alpha.csv").write_text(EXAMPLE_CSV)
    project.wait_for("alpha's gallery", lambda: gallery(project, "alpha").exists())

    # Two files within one sensor tick, and a bad one.
    (project.prompts / "beta.csv").write_text(SECOND_CSV)
    (project.prompts / "gamma.csv").write_text(SECOND_CSV.replace("ramen", "noodles"))
    (project.prompts / "broken.csv").write_text("text\nhello\n")
    project.wait_for(
        "beta's and gamma's galleries",
        lambda: gallery(project, "beta").exists() and gallery(project, "gamma").exists(),
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

    # Beta and gamma, dropped together, were generated together: one run (one model load) per
    # backend, spanning both; none was lost to the other landing in the same tick.
    generate = [run for run in runs if run.job_name == "generate_images"]
    spans = sorted(partitions_of(run) for run in generate)
    assert spans == sorted([f"{b}|alpha" for b in LOCAL] + [f"{b}|beta..{b}|gamma" for b in LOCAL])
    steps = load_run_metadata(project.storage, "steps")
    images = steps[(steps.asset == "images") & (steps.requested > 0)]  # broken plans nothing
    made = sorted(images["prompt_set"] + "|" + images["backend"])
    assert made == sorted(f"{s}|{b}" for s in ("alpha", "beta", "gamma") for b in LOCAL)
    assert set(images["run_id"]) == {run.run_id for run in generate}
    assert images.groupby("run_id")["model_loads"].sum().eq(1).all()  # once per run
    for prompt_set, prompts in (("alpha", 3), ("beta", 2), ("gamma", 2)):
        page = gallery(project, prompt_set).read_text()
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


def test_the_bulk_schedule_generates_what_is_missing(project: RunningProject):
    # A set prepared while automatic generation is off stays missing until the schedule runs.
    project.set_sensor("generate_after_prompts_sensor", running=False)  # `dagster sensor stop`
    (project.prompts / "delta.csv").write_text(SECOND_CSV.replace("ramen", "dumplings"))
    project.wait_for(
        "delta prepared",
        lambda: any(
            run.job_name == "prepare_prompts"
            and partitions_of(run) == "delta"
            and run.status == dg.DagsterRunStatus.SUCCESS
            for run in project.runs()
        ),
    )
    start = project.cli(
        "dagster", "schedule", "start", "bulk_generation_schedule", "-w", "workspace.yaml"
    )
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
    assert sorted(partitions_of(run) for run in bulk) == sorted(f"{b}|delta" for b in LOCAL)
    project.cli("dagster", "schedule", "stop", "bulk_generation_schedule", "-w", "workspace.yaml")
    project.set_sensor("generate_after_prompts_sensor", running=True)


@needs_chromium
def test_the_images_partitions_page_renders(project: RunningProject, tmp_path: Path):
    screenshot = chromium_screenshot(
        f"http://127.0.0.1:{project.port}/assets/images?view=partitions",
        "images-partitions.png",
        tmp_path / "chromium",
        size=(1400, 1000),
        wait_ms=20000,
    )
    assert screenshot.stat().st_size > 20_000


@needs_chromium
def test_review_rejects_by_keyboard_and_the_daemon_replaces_them(project: RunningProject):
    from playwright.sync_api import expect, sync_playwright

    from imagegen_pipeline.reviews import read_verdicts
    from imagegen_pipeline.steps.regenerate import replacement_seed
    from tests.support.running_project import PROJECT_ROOT, free_port, stop_process_group

    for name, text in (("alpha", EXAMPLE_CSV), ("beta", SECOND_CSV)):  # when run on its own
        if not gallery(project, name).exists():
            (project.prompts / f"{name}.csv").write_text(text)
    project.wait_for(
        "alpha's and beta's galleries",
        lambda: gallery(project, "alpha").exists() and gallery(project, "beta").exists(),
    )
    project.wait_for("every run to end", project.idle)
    imagegen = str(PROJECT_ROOT / ".venv" / "bin" / "imagegen")
    # Another host without a token: refused before listening.
    refused = subprocess.run(
        [imagegen, "review", "--host", "0.0.0.0"], env=project.env, capture_output=True, text=True
    )
    assert refused.returncode != 0 and "IMAGEGEN_REVIEW_TOKEN" in refused.stderr
    port = free_port()
    app = subprocess.Popen(
        [imagegen, "review", "--port", str(port)],
        env=project.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        project.wait_for("the review app", lambda: _answers(url), timeout=60)
        for attempt in ("/files/%2e%2e/%2e%2e/etc/passwd", "/files/images/../../../etc/passwd"):
            assert _status(url, attempt) == 404, attempt
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url + "/")
            expect(page.locator("tr.set-row")).to_have_count(len(_sets(project)))
            page.get_by_role("link", name="alpha", exact=True).click()
            page.select_option("select[name=backend]", "flux_schnell")
            page.click("#apply")
            cards = page.locator(".card")
            expect(cards).to_have_count(4)  # cat x2, city, owl
            rejected = [cards.nth(i).get_attribute("data-image") for i in (0, 1)]
            page.keyboard.press("ArrowRight")  # focus the first card
            page.keyboard.press("r")
            expect(cards.nth(0)).to_have_class(re.compile("reject"))
            page.keyboard.press("r")  # the focus moved on to the second card
            expect(cards.nth(1)).to_have_class(re.compile("reject"))
            parts = list((project.storage / "reviews" / "alpha" / "flux_schnell").glob("*.parquet"))
            assert len(parts) == 2
            verdicts = read_verdicts(Storage(project.storage), "alpha", "flux_schnell")
            assert sorted(verdicts["image_id"]) == sorted(rejected)
            assert set(verdicts["verdict"]) == {"reject"}

            def replaced() -> bool:
                rows = load_run_metadata(project.storage, "images", prompt_set="alpha")
                return set(rows["replaces"].dropna()) == set(rejected)

            project.wait_for("the rejected images to be replaced", replaced)
            rows = load_run_metadata(project.storage, "images", prompt_set="alpha")
            for row in rows.dropna(subset=["replaces"]).to_dict("records"):  # the next seeds
                assert row["seed"] == replacement_seed(row["prompt_id"], row["image_index"], 1)
                old = rows[rows["image_id"] == row["replaces"]].iloc[0]
                assert Path(old["path"]).exists()  # the rejected image stays on disk
            runs = [run for run in project.runs() if run.job_name == "regenerate_images"]
            assert [run.tags["imagegen/backend"] for run in runs] == ["flux_schnell"]
            project.wait_for("the regenerate run to end", project.idle)
            page.reload()
            expect(cards).to_have_count(4)
            shown = {cards.nth(i).get_attribute("data-image") for i in range(4)}
            assert not shown & set(rejected)  # the replacements stand in their slots
            expect(page.locator("a.replacement")).to_have_count(2)
            page.locator("a.replacement").first.click()
            expect(page.locator(".history .earlier")).to_have_count(1)
            expect(page.locator(".history")).to_contain_text("reject")
            page.screenshot(path=str(_artifact("review-replacement.png")))
            browser.close()
    finally:
        stop_process_group(app, timeout=10)


def _answers(url: str) -> bool:
    try:
        return _status(url, "/") == 200
    except OSError:
        return False


def _status(url: str, path: str) -> int:
    """The status of a GET of ``path`` sent as is (urllib would normalise the dots)."""
    import http.client

    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def _sets(project: RunningProject) -> set[str]:
    return set(load_run_metadata(project.storage, "images")["prompt_set"])


def _artifact(name: str) -> Path:
    from tests.conftest import ARTIFACTS

    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / name
