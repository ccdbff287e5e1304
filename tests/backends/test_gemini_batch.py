"""Gemini batch mode through the real google-genai client against the loopback Batch API."""

from __future__ import annotations

import base64
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagegen_pipeline.backends.base import ImageRequest
from imagegen_pipeline.backends.gemini.backend import GeminiBackend, checked_settings
from imagegen_pipeline.backends.gemini.prices import MODEL_PRICES, UnknownModelPriceError
from imagegen_pipeline.backends.gemini.settings import GeminiSettings
from imagegen_pipeline.run_metadata import load_run_metadata
from imagegen_pipeline.steps.gemini_batch import BatchImagesKind, open_batch_jobs
from imagegen_pipeline.steps.images import (
    ImagesStepContext,
    PlannedImage,
    content_address,
    run_images_step,
)
from imagegen_pipeline.storage import Storage
from tests.support.fake_gemini_batch import FakeGeminiBatch
from tests.support.fake_servers import FAKE_GEMINI_KEY

FAST = {
    "api_key": FAKE_GEMINI_KEY,
    "mode": "batch",
    "timeout_seconds": 2.0,
    "initial_backoff_seconds": 0.01,
    "max_backoff_seconds": 0.05,
    "batch_poll_seconds": 0.05,
    "batch_wait_seconds": 5.0,
}


@pytest.fixture
def server() -> Iterator[FakeGeminiBatch]:
    """Jobs pending for 0.1 s, running for 0.1 s, then final."""
    with FakeGeminiBatch(api_key=FAKE_GEMINI_KEY, pending_seconds=0.1, running_seconds=0.1) as s:
        yield s


def backend_on(server: FakeGeminiBatch, **overrides) -> GeminiBackend:
    return GeminiBackend(GeminiSettings(base_url=server.url, **{**FAST, **overrides}))


def planned_images(backend: GeminiBackend, count: int, tag: str = "") -> list[PlannedImage]:
    planned = []
    for index in range(count):
        request = ImageRequest(
            prompt_id=f"p{index}",
            image_index=0,
            prompt=f"a lighthouse in a storm {tag}[p{index}]",
            negative_prompt="",
            seed=index,
            width=1024,
            height=1024,
        )
        image_id = content_address(backend.settings, request)
        planned.append(PlannedImage(request, image_id, f"p{index}/00_{image_id[:16]}.png"))
    return planned


def run(backend, planned, storage: Storage, run_id: str, kind=BatchImagesKind, log=None):
    step = ImagesStepContext(storage=storage, prompt_set="storm", run_id=run_id)
    lines: list[str] = []
    outcome = run_images_step(
        backend.target, lambda: backend, planned, step, log=log or lines.append, kind=kind
    )
    return outcome, lines


def statuses(outcome) -> dict[str, str]:
    return {record.prompt_id: record.status for record in outcome.records}


def test_batches_are_submitted_as_jsonl_polled_and_written(server, tmp_path):
    server.pending_seconds = 0.6  # the first look finds it pending even on a busy machine
    backend = backend_on(server, batch_max_requests=4)
    planned = planned_images(backend, 6)

    outcome, log = run(backend, planned, Storage(tmp_path), "r1")

    assert statuses(outcome) == {f"p{i}": "ok" for i in range(6)}
    assert server.batch_creates == 2  # split by batch_max_requests
    first, second = server.jobs.values()
    assert (first.requests, second.requests) == (4, 2)
    line = server.requests_in(first.name)[0]
    assert line["key"] == planned[0].image_id  # the key is the image's content address
    assert line["request"]["contents"][0]["parts"][0]["text"] == planned[0].request.prompt
    assert line["request"]["generationConfig"] == {
        "responseModalities": ["IMAGE"],
        "imageConfig": {"aspectRatio": "1:1"},
        "seed": 0,
    }
    assert first.gets >= 2  # pending or running first, then succeeded
    progress = [message for message in log if "job(s) open after" in message]
    assert progress and "6 requests: 2 JOB_STATE_PENDING" in progress[0]  # logged while waiting
    for record in outcome.records:
        assert Path(record.path).is_file() and record.sha256
        online = record.prompt_tokens * 0.30e-6 + 1290 * 30e-6
        assert record.cost_usd == pytest.approx(online / 2)  # the batch price
    jobs = load_run_metadata(tmp_path, "batch_jobs", prompt_set="storm", backend="gemini")
    assert sorted(jobs["status"]) == ["collected", "collected"]
    assert sorted(jobs["ok"]) == [2, 4]
    assert open_batch_jobs(Storage(tmp_path)) == []


@pytest.mark.parametrize("retry", ["batch", "online", "none"])
def test_a_partial_failure_is_retried_as_set_and_refusals_are_blocked(server, tmp_path, retry):
    backend = backend_on(server, batch_retry=retry)
    planned = planned_images(backend, 4)
    server.script("[p1]", "server_error")  # a status line in the result file
    server.script("[p2]", "image_safety")  # an answer without an image

    outcome, _ = run(backend, planned, Storage(tmp_path), "r1")

    got = statuses(outcome)
    assert got["p0"] == got["p3"] == "ok" and got["p2"] == "blocked"
    blocked = next(r for r in outcome.records if r.prompt_id == "p2")
    assert "IMAGE_SAFETY" in blocked.error and blocked.path is None
    if retry == "none":
        assert got["p1"] == "failed" and server.batch_creates == 1
        failed = next(r for r in outcome.records if r.prompt_id == "p1")
        assert "INTERNAL" in failed.error or "internal" in failed.error
    elif retry == "batch":
        assert got["p1"] == "ok" and server.batch_creates == 2
        follow_up = list(server.jobs.values())[1]
        assert [line["key"] for line in server.requests_in(follow_up.name)] == [planned[1].image_id]
    else:
        online = [r for r in server.requests if r.path.endswith(":generateContent")]
        assert got["p1"] == "ok" and server.batch_creates == 1 and len(online) == 1


def test_an_expired_job_fails_its_images_with_the_reason(server, tmp_path):
    server.outcomes = ["EXPIRED"]
    backend = backend_on(server, batch_retry="none")

    outcome, _ = run(backend, planned_images(backend, 3), Storage(tmp_path), "r1")

    assert set(statuses(outcome).values()) == {"failed"}
    assert all("EXPIRED" in record.error for record in outcome.records)
    jobs = load_run_metadata(tmp_path, "batch_jobs")
    assert list(jobs["status"]) == ["failed"] and list(jobs["state"]) == ["JOB_STATE_EXPIRED"]


def test_a_503_on_get_is_retried(server, tmp_path):
    server.get_faults = ["unavailable", "unavailable"]
    backend = backend_on(server)

    outcome, _ = run(backend, planned_images(backend, 2), Storage(tmp_path), "r1")

    assert set(statuses(outcome).values()) == {"ok"}
    assert server.responses[503] == 2 and server.batch_creates == 1


def test_a_job_past_its_deadline_is_cancelled_and_reported(tmp_path):
    with FakeGeminiBatch(api_key=FAKE_GEMINI_KEY, pending_seconds=30.0) as slow:
        backend = backend_on(slow, batch_deadline_hours=0.2 / 3600)  # 0.2 s

        outcome, log = run(backend, planned_images(backend, 2), Storage(tmp_path), "r1")

        assert set(statuses(outcome).values()) == {"failed"}
        assert all("cancelled" in record.error for record in outcome.records)
        [job] = slow.jobs.values()
        assert job.state_override == "CANCELLED"
        assert any(":cancel" in request.path for request in slow.requests)
        assert any("cancelled" in message for message in log)


def test_a_run_that_stops_waiting_resumes_the_same_job(tmp_path):
    with FakeGeminiBatch(api_key=FAKE_GEMINI_KEY, pending_seconds=0.5) as slow:
        storage = Storage(tmp_path)
        waiting = backend_on(slow, batch_wait_seconds=0.0)
        planned = planned_images(waiting, 3)

        first, _ = run(waiting, planned, storage, "r1")

        assert set(statuses(first).values()) == {"pending"}
        [job] = open_batch_jobs(storage, "storm", "gemini")
        assert job.status == "open" and job.job_name in slow.jobs  # recorded before waiting
        assert json.loads(job.keys) == [item.image_id for item in planned]

        second, log = run(backend_on(slow), planned, storage, "r2")

        assert set(statuses(second).values()) == {"ok"}
        assert slow.batch_creates == 1  # resumed, never paid twice
        assert any(f"Resuming batch job {job.job_name}" in message for message in log)
        assert open_batch_jobs(storage) == []


class KilledAfterCreate(BatchImagesKind):
    """Dies between creating a job and recording it: the worst moment to be killed."""

    def _write(self, record):
        if record.status == "open":
            raise KeyboardInterrupt("killed")
        return super()._write(record)


def test_a_job_created_but_not_recorded_is_found_by_its_name(server, tmp_path):
    storage = Storage(tmp_path)
    backend = backend_on(server)
    planned = planned_images(backend, 2)

    with pytest.raises(KeyboardInterrupt):
        run(backend, planned, storage, "r1", kind=KilledAfterCreate)
    [intent] = open_batch_jobs(storage)
    assert intent.status == "submitting" and server.batch_creates == 1

    outcome, log = run(backend, planned, storage, "r2")

    assert set(statuses(outcome).values()) == {"ok"}
    assert server.batch_creates == 1
    assert any("created but not recorded" in message for message in log)


def test_the_budget_limits_what_is_submitted(server, tmp_path):
    per_image = MODEL_PRICES["gemini-2.5-flash-image"].per_image / 2
    backend = backend_on(server, budget_usd=per_image * 2.5)

    outcome, _ = run(backend, planned_images(backend, 4), Storage(tmp_path), "r1")

    assert sorted(statuses(outcome).values()) == ["ok", "ok", "skipped_budget", "skipped_budget"]
    assert next(iter(server.jobs.values())).requests == 2


def test_an_unknown_model_needs_explicit_prices_before_any_request(server):
    with pytest.raises(UnknownModelPriceError, match=r"gemini-9-image.*no request was sent"):
        backend_on(server, model="gemini-9-image")
    explicit = {
        "price_per_input_token_usd": 1e-6,
        "price_per_output_token_usd": 50e-6,
        "price_per_output_text_token_usd": 5e-6,
        "tokens_per_image": 1000,
    }
    settings = checked_settings(GeminiSettings(model="gemini-9-image", **FAST, **explicit))
    assert settings.expected_image_usd() == pytest.approx(0.05 / 2)
    assert server.requests == []


@pytest.mark.parametrize(
    ("model", "per_image"),
    [
        ("gemini-2.5-flash-image", 0.0387),
        ("gemini-3.1-flash-image-preview", 0.0672),
        ("gemini-3-pro-image-preview", 0.1344),
    ],
)
def test_the_price_table_per_model_and_mode(model, per_image):
    online = GeminiSettings(model=model)
    assert online.expected_image_usd() == pytest.approx(per_image)
    assert replace_mode(online, "batch").expected_image_usd() == pytest.approx(per_image / 2)


def replace_mode(settings: GeminiSettings, mode: str) -> GeminiSettings:
    return settings.model_copy(update={"mode": mode})


def test_a_process_killed_while_waiting_is_resumed_without_paying_twice(tmp_path):
    from benchmarks.gemini_batch import finish, start_child

    with FakeGeminiBatch(api_key=FAKE_GEMINI_KEY, pending_seconds=1.5, running_seconds=0.2) as s:
        killed = start_child(s.url, "batch", tmp_path, 6, "r-killed")
        assert killed.stdout is not None
        for line in killed.stdout:
            if "job(s) open after" in line:  # recorded, and waiting on it
                break
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert s.batch_creates == 1 and not list(tmp_path.rglob("*.png"))

        resumed = finish(start_child(s.url, "batch", tmp_path, 6, "r-resumed"))

        assert resumed["counts"] == {"ok": 6}
        assert s.batch_creates == 1  # the same job, polled again
        assert len(list(tmp_path.rglob("*.png"))) == 6


class KilledBeforeCreate(BatchImagesKind):
    """Dies after recording its intent, before the job exists."""

    def _write(self, record):
        written = super()._write(record)
        if record.status == "submitting":
            raise KeyboardInterrupt("killed")
        return written


def test_an_intent_without_a_job_is_closed_and_submitted_once(server, tmp_path):
    storage = Storage(tmp_path)
    backend = backend_on(server)
    planned = planned_images(backend, 2)

    with pytest.raises(KeyboardInterrupt):
        run(backend, planned, storage, "r1", kind=KilledBeforeCreate)
    assert server.batch_creates == 0 and len(open_batch_jobs(storage)) == 1

    outcome, _ = run(backend, planned, storage, "r2")

    assert set(statuses(outcome).values()) == {"ok"} and server.batch_creates == 1
    jobs = load_run_metadata(tmp_path, "batch_jobs")
    assert sorted(jobs["status"]) == ["collected", "failed"]  # the intent closed, the job done


def test_a_reference_image_goes_into_the_batch_line_as_online(tmp_path):
    from imagegen_pipeline.backends.gemini.batch import request_line
    from imagegen_pipeline.control import ControlInput

    sketch = tmp_path / "sketch.png"
    sketch.write_bytes(b"\x89PNG fake bytes")
    request = ImageRequest(
        prompt_id="p",
        image_index=0,
        prompt="a castle from this sketch",
        negative_prompt="",
        seed=3,
        width=1920,
        height=1080,
        control=ControlInput(sketch, "0" * 64, "none", 1.0),
    )

    line = request_line("key-1", request)

    image, text = line["request"]["contents"][0]["parts"]
    assert image["inlineData"]["mimeType"] == "image/png"
    assert base64.b64decode(image["inlineData"]["data"]) == b"\x89PNG fake bytes"
    assert text == {"text": "a castle from this sketch"}
    assert line["request"]["generationConfig"]["imageConfig"] == {"aspectRatio": "16:9"}


class KilledBeforeClosing(BatchImagesKind):
    """Dies after its images are written, before the job is recorded collected."""

    def _write(self, record):
        if record.status == "collected":
            raise KeyboardInterrupt("killed")
        return super()._write(record)


def test_a_job_whose_images_are_all_made_is_closed(server, tmp_path):
    from imagegen_pipeline.steps.gemini_batch import close_done_jobs

    storage = Storage(tmp_path)
    backend = backend_on(server)
    with pytest.raises(KeyboardInterrupt):
        run(backend, planned_images(backend, 3), storage, "r1", kind=KilledBeforeClosing)
    assert len(list(tmp_path.rglob("*.png"))) == 3
    [job] = open_batch_jobs(storage)  # nothing left for a run to do, yet open

    assert close_done_jobs(storage, [job]) == []

    assert open_batch_jobs(storage) == []
    [row] = load_run_metadata(tmp_path, "batch_jobs").to_dict("records")
    assert row["status"] == "collected" and "already made" in row["error"]
