"""The Gemini backend against a local fake of the Gemini API, through the real google-genai SDK."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from imagegen_pipeline.backends.base import ImageRequest
from imagegen_pipeline.backends.gemini.backend import DAILY_QUOTA_WARNING, GeminiBackend
from imagegen_pipeline.backends.gemini.content import aspect_ratio_for
from imagegen_pipeline.backends.gemini.errors import MISSING_KEY_MESSAGE, GeminiKeyMissingError
from imagegen_pipeline.backends.gemini.settings import GeminiSettings
from imagegen_pipeline.model_settings import GenerationSettings
from imagegen_pipeline.steps.images import (
    ImagesStepContext,
    PlannedImage,
    content_address,
    run_images_step,
)
from imagegen_pipeline.storage import Storage
from tests.support.fake_servers import FAKE_GEMINI_KEY, FakeGemini, arrival_stats

FAST = {
    "timeout_seconds": 2.0,
    "requests_per_minute": 60_000,  # pacing out of the way unless a test is about it
    "max_concurrent_requests": 4,
    "initial_backoff_seconds": 0.01,
    "max_backoff_seconds": 0.05,
}


def make_backend(server: FakeGemini, **overrides) -> GeminiBackend:
    """A backend on the fake server, with fast timeouts and backoffs."""
    settings = {"api_key": FAKE_GEMINI_KEY, "base_url": server.url, **FAST, **overrides}
    return GeminiBackend(GeminiSettings(**settings))


def request(prompt_id: str, prompt: str | None = None, **changes) -> ImageRequest:
    """A request for one image; the prompt defaults to one naming the id."""
    values = {
        "image_index": 0,
        "prompt": prompt or f"a watercolour painting of {prompt_id}",
        "negative_prompt": "",
        "seed": 7,
        "width": 1024,
        "height": 1024,
    }
    return ImageRequest(prompt_id=prompt_id, **{**values, **changes})


def by_id(results) -> dict[str, object]:
    return {result.request.prompt_id: result for result in results}


def test_ok_image_and_the_request_sent(fake_gemini: FakeGemini):
    backend = make_backend(fake_gemini)
    wanted = request("fox", "a red fox asleep in the snow", seed=1234, width=1920, height=1080)

    [result] = list(backend.generate([wanted]))

    assert result.status == "ok" and result.error == ""
    assert isinstance(result.image, Image.Image) and result.image.size == (64, 36)
    details = result.details
    assert details["finish_reason"] == "STOP" and details["retries"] == 0
    assert details["prompt_tokens"] == len(wanted.prompt) // 4
    assert details["output_tokens"] == 1290
    expected_cost = details["prompt_tokens"] * 0.30e-6 + 1290 * 30e-6
    assert details["cost_usd"] == pytest.approx(expected_cost)
    assert 0.0386 < details["cost_usd"] < 0.0390  # about $0.039 per image

    [sent] = fake_gemini.requests
    assert sent.path == "/v1beta/models/gemini-2.5-flash-image:generateContent"
    assert sent.headers["x-goog-api-key"] == FAKE_GEMINI_KEY
    assert sent.body["contents"][0]["parts"] == [{"text": "a red fox asleep in the snow"}]
    config = sent.generation_config
    assert config["seed"] == 1234
    assert config["responseModalities"] == ["IMAGE"]
    assert config["imageConfig"] == {"aspectRatio": "16:9"}


@pytest.mark.parametrize(
    ("width", "height", "ratio"),
    [
        (1024, 1024, "1:1"),
        (1920, 1080, "16:9"),
        (1080, 1920, "9:16"),
        (832, 1248, "2:3"),
        (1248, 832, "3:2"),
        (768, 1024, "3:4"),
        (1024, 768, "4:3"),
        (896, 1120, "4:5"),
        (1120, 896, "5:4"),
        (2048, 880, "21:9"),
        (2048, 64, "21:9"),  # beyond the widest: the nearest one
        (512, 528, "1:1"),
    ],
)
def test_aspect_ratio_is_the_nearest_supported(width, height, ratio):
    assert aspect_ratio_for(width, height) == ratio


def test_settings_size_and_device(fake_gemini: FakeGemini):
    backend = make_backend(fake_gemini, model="gemini-2.5-flash-image-preview")
    assert backend.settings == GenerationSettings(
        backend="gemini",
        model_id="gemini-2.5-flash-image-preview",
        revision="api",
        steps=0,
        guidance=0.0,
    )
    assert backend.device == "remote"
    assert backend.default_size == (1024, 1024)
    assert backend.supports_negative_prompt is False
    assert list(backend.generate([])) == []


@pytest.mark.parametrize(
    "fault",
    ["rate_limit", "rate_limit_header", "server_error", "bad_gateway", "unavailable", "hang"],
)
def test_transient_faults_are_retried_and_counted(fake_gemini: FakeGemini, fault: str):
    fake_gemini.script("harbour", fault, "ok")
    # Past the hang's start, but long enough that the "ok" answer never times out on a loaded
    # machine (it did at 0.5 s: two retries).
    backend = make_backend(fake_gemini, timeout_seconds=3)

    [result] = list(backend.generate([request("harbour", "a harbour at dawn")]))

    assert result.status == "ok" and result.image is not None
    assert result.details["retries"] == 1
    assert [sent.fault for sent in fake_gemini.requests] == [fault, "ok"]
    assert backend.last_run.retries == 1 and backend.last_run.http_calls == 2


@pytest.mark.parametrize("fault", ["rate_limit", "rate_limit_header"])
def test_the_server_retry_delay_is_honoured(fault: str):
    with FakeGemini(api_key=FAKE_GEMINI_KEY, retry_delay_seconds=0.4) as server:
        server.script("mill", fault, "ok")
        backend = make_backend(server)  # its own backoff is at most 0.05 s

        [result] = list(backend.generate([request("mill", "a windmill by a canal")]))

        first, second = server.requests
        assert result.status == "ok"
        assert second.received_at - first.received_at >= 0.4


def test_retries_stop_at_the_limit(fake_gemini: FakeGemini):
    fake_gemini.script("quarry", *["server_error"] * 10)
    backend = make_backend(fake_gemini, max_attempts=3)

    [result] = list(backend.generate([request("quarry", "an old quarry lake")]))

    assert result.status == "failed" and result.image is None
    assert "HTTP 500" in result.error and "after 2 retries" in result.error
    assert result.details["retries"] == 2
    assert len(fake_gemini.requests) == 3


def test_timeouts_fail_after_the_retries(fake_gemini: FakeGemini):
    fake_gemini.script("glacier", "hang", "hang")
    backend = make_backend(fake_gemini, timeout_seconds=0.3, max_attempts=2)

    [result] = list(backend.generate([request("glacier", "a blue glacier cave")]))

    assert result.status == "failed"
    assert "timed out after 0.3 s" in result.error
    assert backend.last_run.errors_by_status["timeout"] == 2


@pytest.mark.parametrize(
    ("fault", "finish_reason", "error_part"),
    [
        ("image_safety", "IMAGE_SAFETY", "no image (finishReason IMAGE_SAFETY)"),
        ("image_prohibited", "IMAGE_PROHIBITED_CONTENT", "IMAGE_PROHIBITED_CONTENT"),
        ("no_image", "NO_IMAGE", "no image (finishReason NO_IMAGE)"),
        ("text_only", "STOP", "I can't make that picture"),
        ("prompt_blocked", "PROHIBITED_CONTENT", "prompt blocked"),
    ],
)
def test_refusals_are_blocked_without_a_placeholder(
    fake_gemini: FakeGemini, fault: str, finish_reason: str, error_part: str
):
    fake_gemini.script("castle", fault)
    backend = make_backend(fake_gemini)

    [result] = list(backend.generate([request("castle", "a castle on a hill")]))

    assert result.status == "blocked"
    assert result.image is None
    assert result.details["finish_reason"] == finish_reason
    assert error_part in result.error
    assert result.details["retries"] == 0 and len(fake_gemini.requests) == 1  # never retried


def test_a_malformed_answer_fails_without_retry(fake_gemini: FakeGemini):
    fake_gemini.script("bridge", "malformed")
    backend = make_backend(fake_gemini)

    [result] = list(backend.generate([request("bridge", "a stone bridge in fog")]))

    assert result.status == "failed" and result.image is None
    assert "malformed response" in result.error
    assert len(fake_gemini.requests) == 1


def test_unreachable_server_fails_with_a_network_error():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = GeminiSettings(
        api_key=FAKE_GEMINI_KEY, base_url=f"http://127.0.0.1:{port}", max_attempts=2, **FAST
    )

    [result] = list(GeminiBackend(settings).generate([request("moon")]))

    assert result.status == "failed"
    assert result.error.startswith("network error") and "after 1 retries" in result.error


def test_a_mix_of_faults_loses_nothing_and_writes_no_placeholder(
    fake_gemini: FakeGemini, tmp_path: Path
):
    faults = {
        "ok-one": [],
        "ok-two": [],
        "retry-429": ["rate_limit", "ok"],
        "retry-500": ["server_error", "ok"],
        "retry-503": ["unavailable", "ok"],
        "retry-hang": ["hang", "ok"],
        "safety": ["image_safety"],
        "noimage": ["no_image"],
        "textonly": ["text_only"],
        "promptblock": ["prompt_blocked"],
        "garbled": ["malformed"],
        "dead": ["server_error"] * 5,
    }
    for prompt_id, script in faults.items():
        if script:
            fake_gemini.script(f"[{prompt_id}/0]", *script)  # the first image of each prompt
    backend = make_backend(fake_gemini, timeout_seconds=2, max_attempts=3)
    settings = backend.settings
    planned = []
    for prompt_id in faults:
        for index in range(2):
            prompt = f"a paper lantern [{prompt_id}/{index}]"
            wanted = request(prompt_id, prompt, image_index=index, seed=index)
            image_id = content_address(settings, wanted)
            planned.append(PlannedImage(wanted, image_id, f"{prompt_id}/{index:02d}.png"))
    step = ImagesStepContext(storage=Storage(tmp_path), prompt_set="mix", run_id="r1")

    outcome = run_images_step(backend.target, lambda: backend, planned, step, log=lambda _: None)

    rows = {(row.prompt_id, row.image_index): row for row in outcome.records}
    assert len(rows) == len(planned) == 24  # one row per image: nothing lost
    assert {prompt_id: rows[(prompt_id, 0)].status for prompt_id in faults} == {
        "ok-one": "ok",
        "ok-two": "ok",
        "retry-429": "ok",
        "retry-500": "ok",
        "retry-503": "ok",
        "retry-hang": "ok",
        "safety": "blocked",
        "noimage": "blocked",
        "textonly": "blocked",
        "promptblock": "blocked",
        "garbled": "failed",
        "dead": "failed",
    }
    assert all(rows[(prompt_id, 1)].status == "ok" for prompt_id in faults)
    counts = {status: count for status, count in outcome.counts.items() if count}
    assert counts == {"ok": 18, "failed": 2, "blocked": 4}
    retries = {prompt_id: rows[(prompt_id, 0)].retries for prompt_id in faults}
    assert retries["retry-429"] == retries["retry-hang"] == 1 and retries["dead"] == 2
    for row in outcome.records:
        if row.status == "ok":
            assert row.path and Path(row.path).exists()
            assert row.cost_usd > 0 and row.output_tokens == 1290
        else:
            assert row.path is None and row.sha256 is None
            assert row.error
    assert len(sorted(tmp_path.rglob("*.png"))) == 18  # no file for a blocked or failed image


def test_concurrency_limit_is_respected():
    with FakeGemini(api_key=FAKE_GEMINI_KEY, latency=0.3) as server:
        backend = make_backend(server, max_concurrent_requests=3)

        results = list(backend.generate([request(f"p{i}") for i in range(12)]))

        assert [r.status for r in results] == ["ok"] * 12
        assert server.max_in_flight == 3  # reached, never exceeded
        assert backend.last_run.max_in_flight == 3


def test_requests_are_paced_to_the_requests_per_minute(fake_gemini: FakeGemini):
    backend = make_backend(fake_gemini, requests_per_minute=600, max_concurrent_requests=8)

    results = list(backend.generate([request(f"p{i}") for i in range(20)]))

    assert all(result.status == "ok" for result in results)
    # Arrival times carry the scheduling jitter of a loaded machine (tests run on two workers),
    # up to a tenth of a second, so the checks allow that much: windows of 0.9 s, which a
    # sender paced at 10/s never makes hold an 11th request, and a span short by at most 0.1 s
    # of the 19 gaps of 0.1 s that the average rate of 600/min needs (a CI run saw 1.895 s).
    stats = arrival_stats(fake_gemini.requests, window_seconds=0.9)
    assert stats.count == 20
    assert stats.max_in_window <= 10  # no burst: at most 600/60 in any second
    assert stats.span_seconds >= 19 / 10 - 0.1  # the average rate: paced, not sent at once


@pytest.mark.parametrize("concurrency", [1, 4])
def test_the_budget_cap_skips_the_rest(fake_gemini: FakeGemini, concurrency: int):
    backend = make_backend(
        fake_gemini, budget_usd=0.10, price_per_image_usd=0.039, max_concurrent_requests=concurrency
    )

    results = by_id(backend.generate([request(f"p{i}") for i in range(6)]))

    statuses = sorted(result.status for result in results.values())
    assert statuses == ["ok", "ok"] + ["skipped_budget"] * 4
    skipped = [r for r in results.values() if r.status == "skipped_budget"]
    assert all("budget reached" in r.error and r.image is None for r in skipped)
    assert len(fake_gemini.requests) == 2  # nothing past the budget was sent
    spent = sum(r.details["cost_usd"] for r in results.values() if r.status == "ok")
    assert spent <= 0.10
    assert backend.last_run.budget_reached and backend.last_run.spent_usd == pytest.approx(spent)


def test_a_daily_quota_fails_fast(fake_gemini: FakeGemini):
    fake_gemini.script("first", "daily_quota")
    backend = make_backend(fake_gemini, max_concurrent_requests=1)
    todo = [request("a", "the first lantern")] + [request(f"p{i}") for i in range(5)]

    results = by_id(backend.generate(todo))

    assert len(fake_gemini.requests) == 1  # no retry, nothing sent after it
    assert {r.status for r in results.values()} == {"failed"}
    assert results["a"].error.startswith("daily quota exhausted")
    assert "PerDay" in results["a"].error and results["a"].details["retries"] == 0
    for prompt_id in ("p0", "p4"):
        assert results[prompt_id].error.startswith("not sent: daily quota exhausted")
    assert backend.last_run.daily_quota_exhausted


def test_the_api_key_stays_out_of_reprs_and_errors(fake_gemini: FakeGemini):
    fake_gemini.script("echo", "bad_key")  # the server echoes the key in its error message
    backend = make_backend(fake_gemini)

    [result] = list(backend.generate([request("echo", "an echo in a canyon")]))

    assert result.status == "failed"
    assert "[redacted]" in result.error and FAKE_GEMINI_KEY not in result.error
    for text in (repr(backend.config), str(backend.config), repr(backend), str(result)):
        assert FAKE_GEMINI_KEY not in text


def test_a_wrong_key_is_a_clear_failure(fake_gemini: FakeGemini):
    settings = GeminiSettings(api_key="AIza-wrong-key", base_url=fake_gemini.url, **FAST)

    [result] = list(GeminiBackend(settings).generate([request("owl")]))

    assert result.status == "failed" and "API key not valid" in result.error
    assert len(fake_gemini.requests) == 1  # a 400 is not retried


@pytest.mark.parametrize("key", [None, "", "   "])
def test_a_missing_key_is_a_clear_error(key: str | None):
    with pytest.raises(GeminiKeyMissingError) as raised:
        GeminiBackend(GeminiSettings(api_key=key))
    assert str(raised.value) == MISSING_KEY_MESSAGE
    assert "https://aistudio.google.com/apikey" in MISSING_KEY_MESSAGE


@pytest.mark.parametrize(
    ("setting", "value", "problem"),
    [
        ("timeout_seconds", 0, "must be positive"),
        ("max_concurrent_requests", 0, "must be positive"),
        ("requests_per_minute", -1, "must be positive"),
        ("max_attempts", 0, "must be >= 1"),
        ("budget_usd", -0.01, "must be >= 0"),
    ],
)
def test_settings_out_of_range_are_refused(setting: str, value: float, problem: str):
    with pytest.raises(ValueError, match=f"GeminiSettings.{setting} {problem}"):
        GeminiBackend(GeminiSettings(api_key=FAKE_GEMINI_KEY, **{setting: value}))


def test_the_key_is_used_stripped(fake_gemini: FakeGemini):
    backend = make_backend(fake_gemini, api_key=f"  {FAKE_GEMINI_KEY}\n")

    [result] = list(backend.generate([request("owl")]))

    assert result.status == "ok"
    assert fake_gemini.requests[0].headers["x-goog-api-key"] == FAKE_GEMINI_KEY


def test_results_stream_while_later_requests_run():
    with FakeGemini(api_key=FAKE_GEMINI_KEY, latency=0.2) as server:
        backend = make_backend(server, max_concurrent_requests=1)
        results = backend.generate([request(f"p{i}") for i in range(6)])

        first = next(results)
        seen_at_first = len(server.requests)
        rest = list(results)

        assert first.status == "ok"
        assert seen_at_first < 6  # the first result came before the last request was sent
        assert len(rest) == 5


def test_stopping_early_cancels_the_rest():
    with FakeGemini(api_key=FAKE_GEMINI_KEY, latency=0.2) as server:
        backend = make_backend(server, max_concurrent_requests=1)
        results = backend.generate([request(f"p{i}") for i in range(20)])

        next(results)
        results.close()
        sent = len(server.requests)
        time.sleep(0.5)

        assert len(server.requests) == sent < 20  # nothing more is sent after close()
        assert not [t for t in threading.enumerate() if t.name == "gemini-backend"]


def test_the_run_summary_totals_a_run(fake_gemini: FakeGemini):
    fake_gemini.script("harbour", "rate_limit", "server_error", "ok")
    fake_gemini.script("castle", "image_safety")
    backend = make_backend(fake_gemini)
    todo = [request("harbour", "a harbour at dawn"), request("castle", "a castle on a hill")]
    todo += [request(f"p{i}") for i in range(3)]

    results = list(backend.generate(todo))
    summary = backend.run_summary()

    assert summary.warnings == []
    metadata = summary.metadata
    assert metadata["prompt_tokens"] == sum(r.details["prompt_tokens"] for r in results)
    assert metadata["output_tokens"] == 4 * 1290  # four images; the refusal drew none
    assert metadata["retries"] == 2 and metadata["http_calls"] == 7
    assert metadata["errors_by_status"] == {"429": 1, "500": 1}
    assert type(metadata["errors_by_status"]) is dict  # plain, for Dagster metadata
    assert metadata["spent_usd"] == pytest.approx(sum(r.details["cost_usd"] for r in results))
    assert metadata["budget_reached"] is False and metadata["daily_quota_exhausted"] is False
    assert "budget_usd" not in metadata  # no cap configured
    assert make_backend(fake_gemini).run_summary().metadata["http_calls"] == 0  # before a run


def test_the_run_summary_warns_when_the_budget_is_reached(fake_gemini: FakeGemini):
    backend = make_backend(fake_gemini, budget_usd=0.10, max_concurrent_requests=1)

    results = list(backend.generate([request(f"p{i}") for i in range(5)]))
    summary = backend.run_summary()

    assert [r.status for r in results].count("skipped_budget") == 3
    assert summary.metadata["budget_usd"] == 0.10 and summary.metadata["budget_reached"] is True
    [warning] = summary.warnings
    assert warning.startswith("Gemini budget of $0.10 reached ($0.0")
    assert "3 image(s) were not requested (status skipped_budget)" in warning
    assert "Raise budget_usd" in warning and "re-run" in warning


def test_the_run_summary_warns_about_a_daily_quota(fake_gemini: FakeGemini):
    fake_gemini.script("first", "daily_quota")
    backend = make_backend(fake_gemini, max_concurrent_requests=1)

    list(backend.generate([request("a", "the first lantern"), request("b")]))
    summary = backend.run_summary()

    assert summary.metadata["daily_quota_exhausted"] is True
    assert summary.metadata["errors_by_status"] == {"429": 1}
    assert summary.warnings == [DAILY_QUOTA_WARNING]
    assert "midnight Pacific time" in DAILY_QUOTA_WARNING


def test_the_api_key_stays_out_of_the_run_summary(fake_gemini: FakeGemini):
    fake_gemini.script("echo", "bad_key")  # the server echoes the key in its error message
    fake_gemini.script("first", "daily_quota")
    backend = make_backend(fake_gemini, budget_usd=0.08, max_concurrent_requests=1)
    todo = [request("echo", "an echo in a canyon"), request("a", "the first lantern")]

    list(backend.generate([*todo, request("b"), request("c")]))
    summary = backend.run_summary()

    assert summary.metadata["budget_reached"] and summary.metadata["daily_quota_exhausted"]
    assert len(summary.warnings) == 2
    assert FAKE_GEMINI_KEY not in repr(summary) and FAKE_GEMINI_KEY not in str(summary)


def test_a_control_image_is_sent_as_a_reference_image(fake_gemini: FakeGemini, tmp_path):
    """Gemini has no ControlNet: a row's control image goes before the prompt as an input."""
    import base64

    from imagegen_pipeline.control import control_of

    layout = tmp_path / "layout.png"
    Image.new("RGB", (32, 32), "white").save(layout)
    backend = make_backend(fake_gemini)
    wanted = request("fox", "a red fox", seed=1, width=1024, height=1024)
    wanted = dataclasses.replace(wanted, control=control_of(str(layout), "canny", 1.0))

    [result] = list(backend.generate([wanted]))

    assert result.status == "ok"
    [sent] = fake_gemini.requests
    image_part, text_part = sent.body["contents"][0]["parts"]
    blob = image_part["inlineData"]
    # Protobuf JSON takes either spelling; the SDK sends the field name as declared.
    assert blob.get("mimeType", blob.get("mime_type")) == "image/png"
    data = blob["data"]  # URL-safe base64, unpadded, as the SDK sends bytes
    assert base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)) == layout.read_bytes()
    assert text_part == {"text": "a red fox"}
