"""Scheduled bulk generation, then review: sets prepared while automatic generation is off are
made by the bulk schedule; a reviewer rejects images in the review app (a real browser) and the
daemon replaces them.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import dagster as dg
import pytest

from imagegen_pipeline.run_metadata import load_run_metadata
from imagegen_pipeline.storage import Storage
from tests.conftest import CHROMIUM, EXAMPLE_CSV, SECOND_CSV, needs_chromium
from tests.flows.conftest import LOCAL
from tests.support.running_project import RunningProject, partitions_of

# A stage waits for the real daemon, whose runs share two cores: more than the default 600 s.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def test_the_bulk_schedule_generates_what_is_missing(project: RunningProject):
    # Sets prepared while automatic generation is off stay missing until the schedule runs.
    project.set_sensor("generate_after_prompts_sensor", running=False)  # `dagster sensor stop`
    (project.prompts / "delta.csv").write_text(SECOND_CSV.replace("ramen", "dumplings"))
    project.wait_for("delta prepared", lambda: _prepared(project, "delta"))
    (project.prompts / "alpha.csv").write_text(EXAMPLE_CSV)  # a tick later: the cursor moves on
    project.wait_for("alpha prepared", lambda: _prepared(project, "alpha"))
    assert not [run for run in project.runs() if run.job_name == "generate_images"]
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
    )
    bulk = [run for run in project.runs() if run.tags.get("imagegen/reason", "").startswith("bulk")]
    # One run per backend over both sets.
    assert sorted(partitions_of(run) for run in bulk) == [f"{b}|delta..{b}|alpha" for b in LOCAL]
    assert {run.tags["imagegen/prompt_sets"] for run in bulk} == {"delta,alpha"}
    project.cli("dagster", "schedule", "stop", "bulk_generation_schedule", "-w", "workspace.yaml")


def _prepared(project: RunningProject, prompt_set: str) -> bool:
    return any(
        run.job_name == "prepare_prompts"
        and partitions_of(run) == prompt_set
        and run.status == dg.DagsterRunStatus.SUCCESS
        for run in project.runs()
    )


@needs_chromium
def test_review_rejects_by_keyboard_and_the_daemon_replaces_them(project: RunningProject):
    from playwright.sync_api import expect, sync_playwright

    from imagegen_pipeline.reviews import read_verdicts
    from imagegen_pipeline.steps.regenerate import replacement_seed
    from tests.support.running_project import PROJECT_ROOT, free_port, stop_process_group

    # delta and alpha came from the schedule (the test before).
    project.wait_for("alpha's gallery", lambda: project.gallery("alpha").exists())
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
            expect(page.locator("#summary-rejected")).to_have_text("2")  # the header, live
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
            (regenerated,) = runs
            # Then the set's pipeline runs again for them: scored, keepers chosen, animated.
            reason = f"replaced:{regenerated.run_id}"
            project.wait_for(
                "the replacements to be scored",
                lambda: any(
                    run.tags.get("imagegen/reason") == reason
                    and run.status == dg.DagsterRunStatus.SUCCESS
                    for run in project.runs()
                ),
            )
            (follow_up,) = [r for r in project.runs() if r.tags.get("imagegen/reason") == reason]
            assert partitions_of(follow_up) == "flux_schnell|alpha"
            project.wait_for("every run to end", project.idle)
            page.reload()
            expect(cards).to_have_count(4)
            shown = {cards.nth(i).get_attribute("data-image") for i in range(4)}
            assert not shown & set(rejected)  # the replacements stand in their slots
            replacements = page.locator(".card", has=page.locator("a.replacement"))
            expect(replacements).to_have_count(2)
            for index in range(2):  # scored, as the reviewer sees it
                expect(replacements.nth(index).locator(".facts")).to_contain_text("CLIP")
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
