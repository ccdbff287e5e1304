"""The Gemini and Ollama prompt enhancers against local fakes of their APIs."""

from __future__ import annotations

import socket
from pathlib import Path

import pandas as pd
import pytest
from google.genai import errors as genai_errors

from imagegen_pipeline.enhancement import TemplateEnhancer, enhance_prompts
from imagegen_pipeline.enhancement.llm import (
    INSTRUCTION,
    EnhancementCache,
    EnhancerError,
    GeminiTextEnhancer,
    OllamaEnhancer,
    clean_answer,
)
from tests.support.fake_servers import FAKE_GEMINI_KEY, FakeGemini, FakeOllama

PROMPT = "a lighthouse on a cliff"
ATTEMPTS = 3  # calls per prompt in the failure tests: retries spent quickly
# Waits of a few milliseconds: the retry schedule is real, just short.
FAST_BACKOFF = {"initial_backoff_seconds": 0.01, "max_backoff_seconds": 0.05}


def gemini(server: FakeGemini, cache_dir: Path | None = None, **changes) -> GeminiTextEnhancer:
    cache = EnhancementCache(cache_dir) if cache_dir else None
    settings = {
        "api_key": FAKE_GEMINI_KEY,
        "base_url": server.url,
        "timeout_seconds": 2.0,
        **FAST_BACKOFF,
    }
    return GeminiTextEnhancer(cache=cache, **{**settings, **changes})


def ollama(server: FakeOllama, cache_dir: Path | None = None, **changes) -> OllamaEnhancer:
    cache = EnhancementCache(cache_dir) if cache_dir else None
    settings = {"base_url": server.url, "timeout_seconds": 2.0, **FAST_BACKOFF}
    return OllamaEnhancer(cache=cache, **{**settings, **changes})


def prompt_table(count: int) -> pd.DataFrame:
    """A validated prompt set of ``count`` rows, prompts "a red barn number <i>"."""
    return pd.DataFrame(
        {
            "prompt_id": [f"p{i}" for i in range(count)],
            "prompt": [f"a red barn number {i}" for i in range(count)],
            "style": "none",
            "negative_prompt": "",
            "line": range(2, count + 2),
            "seed": None,
            "width": None,
            "height": None,
            "num_images": 1,
            "backends": [["flux_schnell"]] * count,
        }
    )


def unused_port() -> int:
    """A port of 127.0.0.1 nobody listens on: connections to it are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_gemini_output_is_used_and_recorded(fake_gemini: FakeGemini, tmp_path: Path):
    enhancer = gemini(fake_gemini, tmp_path)

    result = enhancer.enhance(PROMPT, "cinematic", "people")

    assert result.text.startswith(f"{PROMPT}, rich in detail")
    assert (result.method, result.model, result.fallback_reason) == (
        "gemini",
        "gemini-2.5-flash",
        "",
    )
    # The negative prompt is the template's: the user's, then the style's.
    assert (
        result.negative_prompt
        == TemplateEnhancer().enhance(PROMPT, "cinematic", "people").negative_prompt
    )
    [sent] = fake_gemini.requests
    assert sent.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert sent.headers["x-goog-api-key"] == FAKE_GEMINI_KEY
    assert sent.body["systemInstruction"]["parts"][0]["text"] == INSTRUCTION
    assert "Style: cinematic" in sent.prompt and f"Prompt: {PROMPT}" in sent.prompt
    assert "responseModalities" not in sent.generation_config


def test_ollama_output_is_used_and_recorded(fake_ollama: FakeOllama, tmp_path: Path):
    enhancer = ollama(fake_ollama, tmp_path, model="llama3.2")

    result = enhancer.enhance(PROMPT, "anime")

    assert result.text.startswith(f"{PROMPT}, rich in detail")
    assert (result.method, result.model, result.fallback_reason) == ("ollama", "llama3.2", "")
    [sent] = fake_ollama.requests
    assert sent.path == "/api/generate"
    assert sent.body["model"] == "llama3.2" and sent.body["stream"] is False
    assert sent.body["system"] == INSTRUCTION and f"Prompt: {PROMPT}" in sent.body["prompt"]


@pytest.mark.parametrize("which", ["gemini", "ollama"])
def test_a_second_run_is_served_from_the_cache(
    which: str, fake_gemini: FakeGemini, fake_ollama: FakeOllama, tmp_path: Path
):
    server = fake_gemini if which == "gemini" else fake_ollama
    make = gemini if which == "gemini" else ollama
    first = make(server, tmp_path).enhance(PROMPT, "photorealistic")
    calls = len(server.requests)

    again = make(server, tmp_path).enhance(PROMPT, "photorealistic")  # a new enhancer: a re-run

    assert again == first
    assert len(server.requests) == calls == 1  # no HTTP call the second time
    assert len(list(tmp_path.rglob("*.json"))) == 1
    # Another style, model or prompt is another key.
    make(server, tmp_path).enhance(PROMPT, "anime")
    assert len(server.requests) == 2


def test_the_cache_key_includes_method_and_model(fake_ollama: FakeOllama, tmp_path: Path):
    cache = EnhancementCache(tmp_path)
    cache.put("ollama", "llama3.2", PROMPT, "none", "cached text")

    assert cache.get("ollama", "llama3.2", PROMPT, "none") == "cached text"
    assert cache.get("ollama", "qwen2.5", PROMPT, "none") is None
    assert cache.get("gemini", "llama3.2", PROMPT, "none") is None
    assert not list(tmp_path.rglob(".*.tmp"))  # written atomically, nothing left behind


@pytest.mark.parametrize(
    ("fault", "reason", "calls"),
    [
        ("rate_limit", "HTTP 429 RESOURCE_EXHAUSTED: Quota exceeded.", ATTEMPTS),
        ("server_error", "HTTP 500 INTERNAL: An internal error has occurred.", ATTEMPTS),
        ("unavailable", "HTTP 503 UNAVAILABLE: The model is overloaded.", ATTEMPTS),
        ("hang", "timed out after 0.5 s", ATTEMPTS),
        ("malformed", "JSONDecodeError", 1),  # an answer, just a broken one: not retried
        ("empty_text", "empty answer", 1),
    ],
)
def test_gemini_failures_fall_back_to_the_template(
    fake_gemini: FakeGemini, tmp_path: Path, fault: str, reason: str, calls: int
):
    fake_gemini.script(PROMPT, *[fault] * ATTEMPTS)  # every attempt fails
    enhancer = gemini(fake_gemini, tmp_path, timeout_seconds=0.5, max_attempts=ATTEMPTS)

    result = enhancer.enhance(PROMPT, "artistic")

    template = TemplateEnhancer().enhance(PROMPT, "artistic")
    assert (result.text, result.method, result.model) == (template.text, "template", "")
    assert result.fallback_reason.startswith(f"gemini gemini-2.5-flash failed: {reason}")
    assert result.fallback_reason.endswith(f" (after {calls} attempts)") is (calls > 1)
    assert len(fake_gemini.requests) == calls
    assert not list(tmp_path.rglob("*.json"))  # fallbacks are not cached
    fake_gemini.script(PROMPT)  # whatever the script left: answer normally from now on
    assert enhancer.enhance(PROMPT, "artistic").method == "gemini"  # the next call tries again


@pytest.mark.parametrize(
    ("fault", "reason", "calls"),
    [
        ("server_error", "HTTP 500: llama runner process has terminated", ATTEMPTS),
        ("model_missing", "HTTP 404: model 'llama3.2' not found", 1),
        ("hang", "timed out after 0.5 s", ATTEMPTS),
        ("malformed", "answer is not JSON", 1),
        ("empty", "empty answer", 1),
    ],
)
def test_ollama_failures_fall_back_to_the_template(
    fake_ollama: FakeOllama, tmp_path: Path, fault: str, reason: str, calls: int
):
    fake_ollama.script(PROMPT, *[fault] * ATTEMPTS)  # every attempt fails
    enhancer = ollama(fake_ollama, tmp_path, timeout_seconds=0.5, max_attempts=ATTEMPTS)

    result = enhancer.enhance(PROMPT, "none")

    assert (
        result.method == "template"
        and result.text == TemplateEnhancer().enhance(PROMPT, "none").text
    )
    assert result.fallback_reason.startswith(f"ollama llama3.2 failed: {reason}")
    assert result.fallback_reason.endswith(f" (after {calls} attempts)") is (calls > 1)
    assert len(fake_ollama.requests) == calls
    assert not list(tmp_path.rglob("*.json"))


def test_an_unreachable_ollama_falls_back_then_stops_calling(tmp_path: Path):
    url = f"http://127.0.0.1:{unused_port()}"
    enhancer = OllamaEnhancer(base_url=url, cache=EnhancementCache(tmp_path), **FAST_BACKOFF)

    table = enhance_prompts(prompt_table(5), enhancer)  # the set goes on whatever the LLM does

    assert list(table["method"]) == ["template"] * 5
    first, *rest = table["fallback_reason"]
    assert first.startswith(f"ollama llama3.2 failed: cannot reach Ollama at {url}")
    assert "attempts" not in first  # a refused local connection is not retried
    assert all(
        reason.startswith("ollama llama3.2 not called: unavailable earlier in this set")
        and f"cannot reach Ollama at {url}" in reason
        for reason in rest
    )
    assert enhancer.calls == 1  # the breaker opened after the first prompt


def test_an_unknown_ollama_model_opens_the_breaker(fake_ollama: FakeOllama):
    enhancer = ollama(fake_ollama, model="no-such-model")

    table = enhance_prompts(prompt_table(3), enhancer)

    assert list(table["method"]) == ["template"] * 3
    assert "HTTP 404: model 'no-such-model' not found" in table["fallback_reason"][0]
    assert table["fallback_reason"][2].startswith("ollama no-such-model not called")
    assert len(fake_ollama.requests) == 1


def test_ollama_retries_a_burst_of_server_errors(fake_ollama: FakeOllama):
    fake_ollama.script("number 0", "server_error", "server_error")
    fake_ollama.script("number 1", "hang")
    enhancer = ollama(fake_ollama, timeout_seconds=2, max_attempts=ATTEMPTS)

    table = enhance_prompts(prompt_table(3), enhancer)

    assert list(table["method"]) == ["ollama"] * 3 and set(table["fallback_reason"]) == {""}
    faults = [request.fault for request in fake_ollama.requests]
    assert faults == ["server_error", "server_error", "ok", "hang", "ok", "ok"]
    assert enhancer.calls == 3  # retries are not counted as prompts


def test_a_burst_of_429s_within_the_retry_budget_loses_no_llm_prompt(fake_gemini: FakeGemini):
    # The old rule fell back after one failed call and stopped calling after three in a row:
    # this burst would have turned the whole set into template prompts.
    fake_gemini.script("number 0", "rate_limit", "rate_limit")
    fake_gemini.script("number 1", "rate_limit", "unavailable", "rate_limit", "server_error")
    fake_gemini.script("number 2", "rate_limit")
    enhancer = gemini(fake_gemini)  # the default budget: 5 attempts per prompt

    table = enhance_prompts(prompt_table(4), enhancer)

    assert list(table["method"]) == ["gemini"] * 4 and set(table["fallback_reason"]) == {""}
    # The retries are in the server's log: 7 errors, then an answer for every prompt.
    statuses = [request.status for request in fake_gemini.requests]
    assert statuses == [429, 429, 200, 429, 503, 429, 500, 200, 429, 200, 200]
    assert [len(fake_gemini.requests_for(f"number {i}")) for i in range(4)] == [3, 5, 2, 1]
    assert enhancer.calls == 4


def test_a_server_that_keeps_answering_429_falls_back_after_the_attempts(
    fake_gemini: FakeGemini,
):
    fake_gemini.default_fault = "rate_limit"  # every request, however many
    enhancer = gemini(fake_gemini, max_attempts=4)

    first = enhancer.enhance(PROMPT, "none")

    assert first.method == "template"
    assert first.fallback_reason == (
        "gemini gemini-2.5-flash failed: HTTP 429 RESOURCE_EXHAUSTED: Quota exceeded. "
        "(after 4 attempts)"
    )
    assert [request.status for request in fake_gemini.requests] == [429] * 4
    # A 429 is no reason to stop calling: the next prompt tries again, with its own retries.
    second = enhancer.enhance("a windmill by a canal", "none")
    assert second.method == "template" and "after 4 attempts" in second.fallback_reason
    assert len(fake_gemini.requests) == 8


def test_an_unreachable_gemini_opens_the_breaker():
    url = f"http://127.0.0.1:{unused_port()}"
    enhancer = GeminiTextEnhancer(api_key=FAKE_GEMINI_KEY, base_url=url, **FAST_BACKOFF)

    table = enhance_prompts(prompt_table(4), enhancer)

    assert list(table["method"]) == ["template"] * 4
    first, *rest = table["fallback_reason"]
    # The SDK retries a refused connection too; after that the service counts as down.
    assert first.startswith(f"gemini gemini-2.5-flash failed: cannot reach {url}")
    assert first.endswith("(after 5 attempts)")
    assert all(
        reason.startswith("gemini gemini-2.5-flash not called: unavailable earlier in this set")
        for reason in rest
    )
    assert enhancer.calls == 1


def test_an_exhausted_daily_quota_opens_the_breaker(fake_gemini: FakeGemini):
    fake_gemini.default_fault = "daily_quota"
    enhancer = gemini(fake_gemini, max_attempts=2)

    table = enhance_prompts(prompt_table(3), enhancer)

    assert list(table["method"]) == ["template"] * 3
    first, *rest = table["fallback_reason"]
    assert first.startswith("gemini gemini-2.5-flash failed: daily quota exhausted (Generate")
    assert "HTTP 429" in first
    assert all(reason.startswith("gemini gemini-2.5-flash not called") for reason in rest)
    assert len(fake_gemini.requests) == 2  # the first prompt's attempts, then nothing


@pytest.mark.parametrize(
    ("code", "status", "reason", "unavailable"),
    [
        (400, "INVALID_ARGUMENT", "API_KEY_INVALID", True),  # Gemini's answer to a bad key
        (400, "INVALID_ARGUMENT", "", False),  # a bad request: only this prompt
        (401, "UNAUTHENTICATED", "", True),
        (403, "PERMISSION_DENIED", "", True),
        (404, "NOT_FOUND", "", True),  # an unknown model
        (429, "RESOURCE_EXHAUSTED", "", False),
        (500, "INTERNAL", "", False),
        (503, "UNAVAILABLE", "", False),
    ],
)
def test_which_gemini_errors_open_the_breaker(
    code: int, status: str, reason: str, unavailable: bool
):
    details = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason}]
    body = {"error": {"code": code, "status": status, "message": "no", "details": details}}
    error = genai_errors.APIError(code, body)
    enhancer = GeminiTextEnhancer(api_key=FAKE_GEMINI_KEY)

    assert enhancer.is_unavailable(error) is unavailable
    assert enhancer.is_transient(error) is (code in (429, 500, 503))


def test_at_least_one_attempt():
    with pytest.raises(ValueError, match="max_attempts must be at least 1"):
        OllamaEnhancer(max_attempts=0)


def test_the_api_key_stays_out_of_reasons_and_reprs(fake_gemini: FakeGemini, tmp_path: Path):
    enhancer = gemini(fake_gemini, tmp_path)
    fake_gemini.script(PROMPT, "bad_key")  # the server echoes the key in its error

    result = enhancer.enhance(PROMPT, "none")

    assert result.method == "template" and "API key not valid" in result.fallback_reason
    for text in (result.fallback_reason, repr(enhancer), repr(result)):
        assert FAKE_GEMINI_KEY not in text


def test_the_gemini_enhancer_needs_a_key():
    with pytest.raises(ValueError, match="GEMINI_API_KEY is not set"):
        GeminiTextEnhancer(api_key="")


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ('"A lighthouse on a cliff at dusk."', "A lighthouse on a cliff at dusk."),
        ("Here is the prompt: a lighthouse at night", "a lighthouse at night"),
        ("Prompt: a LIGHTHOUSE,\n  stormy sea", "a LIGHTHOUSE, stormy sea"),
        ("<think>hmm</think> a lighthouse, fog", "a lighthouse, fog"),
    ],
)
def test_answers_are_cleaned(answer: str, expected: str):
    assert clean_answer(answer, PROMPT) == expected


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ("", "empty answer"),
        ("   ", "empty answer"),
        ("I'm sorry, but I can't help with that.", "refused"),
        ("A bowl of fruit on a kitchen table.", "lost the subject"),
        ("lighthouse " * 200, "too long"),
    ],
)
def test_unusable_answers_are_rejected(answer: str, problem: str):
    with pytest.raises(EnhancerError, match=problem):
        clean_answer(answer, PROMPT)
