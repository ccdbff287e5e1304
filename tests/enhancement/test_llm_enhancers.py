"""The Gemini and Ollama prompt enhancers against local fakes of their APIs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from imagegen_pipeline.enhancement import TemplateEnhancer, enhance_prompts
from imagegen_pipeline.enhancement.llm import (
    INSTRUCTION,
    EnhancementCache,
    EnhancerError,
    GeminiTextEnhancer,
    OllamaEnhancer,
    clean_answer,
)
from tests.fake_servers import FAKE_GEMINI_KEY, FakeGemini, FakeOllama

PROMPT = "a lighthouse on a cliff"


def gemini(server: FakeGemini, cache_dir: Path | None = None, **changes) -> GeminiTextEnhancer:
    cache = EnhancementCache(cache_dir) if cache_dir else None
    settings = {"api_key": FAKE_GEMINI_KEY, "base_url": server.url, "timeout_seconds": 2.0}
    return GeminiTextEnhancer(cache=cache, **{**settings, **changes})


def ollama(server: FakeOllama, cache_dir: Path | None = None, **changes) -> OllamaEnhancer:
    cache = EnhancementCache(cache_dir) if cache_dir else None
    settings = {"base_url": server.url, "timeout_seconds": 2.0}
    return OllamaEnhancer(cache=cache, **{**settings, **changes})


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
    ("fault", "reason"),
    [
        ("server_error", "HTTP 500"),
        ("unavailable", "HTTP 503"),
        ("hang", "timed out after 0.5 s"),
        ("malformed", "JSONDecodeError"),
        ("empty_text", "empty answer"),
    ],
)
def test_gemini_failures_fall_back_to_the_template(
    fake_gemini: FakeGemini, tmp_path: Path, fault: str, reason: str
):
    fake_gemini.script(PROMPT, fault)
    enhancer = gemini(fake_gemini, tmp_path, timeout_seconds=0.5)

    result = enhancer.enhance(PROMPT, "artistic")

    template = TemplateEnhancer().enhance(PROMPT, "artistic")
    assert (result.text, result.method, result.model) == (template.text, "template", "")
    assert result.fallback_reason.startswith("gemini gemini-2.5-flash failed: ")
    assert reason in result.fallback_reason
    assert not list(tmp_path.rglob("*.json"))  # fallbacks are not cached
    assert enhancer.enhance(PROMPT, "artistic").method == "gemini"  # the next call tries again


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("server_error", "HTTP 500: llama runner process has terminated"),
        ("model_missing", "HTTP 404: model 'llama3.2' not found"),
        ("hang", "timed out after 0.5 s"),
        ("malformed", "answer is not JSON"),
        ("empty", "empty answer"),
    ],
)
def test_ollama_failures_fall_back_to_the_template(
    fake_ollama: FakeOllama, tmp_path: Path, fault: str, reason: str
):
    fake_ollama.script(PROMPT, fault)
    enhancer = ollama(fake_ollama, tmp_path, timeout_seconds=0.5)

    result = enhancer.enhance(PROMPT, "none")

    assert (
        result.method == "template"
        and result.text == TemplateEnhancer().enhance(PROMPT, "none").text
    )
    assert (
        result.fallback_reason.startswith("ollama llama3.2 failed: ")
        and reason in result.fallback_reason
    )
    assert not list(tmp_path.rglob("*.json"))


def test_an_unreachable_ollama_falls_back_then_stops_calling(tmp_path: Path):
    enhancer = OllamaEnhancer(base_url="http://127.0.0.1:9", cache=EnhancementCache(tmp_path))
    prompts = pd.DataFrame(
        {
            "prompt_id": [f"p{i}" for i in range(5)],
            "prompt": [f"a red barn number {i}" for i in range(5)],
            "style": "none",
            "negative_prompt": "",
            "line": range(2, 7),
            "seed": None,
            "width": None,
            "height": None,
            "num_images": 1,
            "backends": [["flux_schnell"]] * 5,
        }
    )

    table = enhance_prompts(prompts, enhancer)  # the set goes on whatever the LLM does

    assert list(table["method"]) == ["template"] * 5
    reasons = list(table["fallback_reason"])
    assert all("cannot reach Ollama at http://127.0.0.1:9" in reason for reason in reasons[:3])
    assert all("not called after 3 failures in a row" in reason for reason in reasons[3:])
    assert enhancer.calls == 3


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
