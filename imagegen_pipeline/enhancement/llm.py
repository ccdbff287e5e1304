"""LLM prompt enhancers: Gemini (google-genai SDK) and a local Ollama, with an on-disk cache.

Both send the same few-shot instruction, which turns a short prompt into a detailed one for a
text-to-image model while keeping the user's subject and the requested style. The negative
prompt always comes from the template enhancer's per-style negatives (LLMs write poor negative
prompts, and the diffusion backends read them through classifier-free guidance).

Answers are cached on disk by (method, model, prompt, style), one small JSON file per key,
written atomically, so a re-run never calls the LLM again for a prompt it already enhanced.

Failures, in three tiers:

- *Transient* (HTTP 408, 429, 5xx; a timeout): the call is retried with exponential backoff,
  up to ``max_attempts`` calls per prompt. Gemini uses google-genai's own ``HttpRetryOptions``
  (which also retries a refused connection); Ollama, called through urllib, has a small loop
  backing off the same way. A burst of 429s thus costs time, not LLM prompts.
- *Final* (retries spent, another HTTP error, an empty or unusable answer): that prompt falls
  back to the template enhancer with ``fallback_reason`` saying why. Fallbacks are never
  cached, so the next run tries the LLM again.
- *Unavailable*, meaning the service cannot answer at all (it cannot be reached; the key is
  refused: 401/403, or Gemini's 400 API_KEY_INVALID; the model is unknown: 404; Gemini's daily
  quota is exhausted): the prompt falls back and a circuit breaker opens, so the rest of the set
  falls back at once instead of paying one timeout or retry schedule per prompt. A 429 or 5xx
  never opens it: those pass.
"""

from __future__ import annotations

import json
import random
import re
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any

from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from imagegen_pipeline.enhancement.base import Enhancement
from imagegen_pipeline.enhancement.cache import EnhancementCache
from imagegen_pipeline.enhancement.template import TemplateEnhancer
from imagegen_pipeline.gemini_client import (
    CONNECT_ERRORS,
    RETRYABLE_STATUS_CODES,
    SDK_RETRIED_ERRORS,
    daily_quota_ids,
    error_details,
    error_reasons,
    make_gemini_client,
    redact,
)
from imagegen_pipeline.model_settings import EnhancerSettings

# The defaults are declared once, in EnhancerSettings (model_settings.py).
_DEFAULTS = EnhancerSettings.model_fields
DEFAULT_GEMINI_TEXT_MODEL: str = _DEFAULTS["gemini_text_model"].default
DEFAULT_OLLAMA_BASE_URL: str = _DEFAULTS["ollama_base_url"].default
DEFAULT_OLLAMA_MODEL: str = _DEFAULTS["ollama_model"].default
# Bump when the instruction changes, so cached answers written under the old one are not reused.
INSTRUCTION_VERSION = 1
MAX_ANSWER_CHARS = 1500
MAX_REASON_CHARS = 300
# HTTP statuses that mean the service will not answer this enhancer at all: a refused key, an
# unknown model (Ollama: not pulled). Any later call would fail the same way.
UNAVAILABLE_STATUS_CODES = frozenset({401, 403, 404})

STYLE_HINTS = {
    "photorealistic": "a photograph: camera, lens, natural light, real materials",
    "artistic": "a painting or illustration: medium, brushwork, palette",
    "cinematic": "a film still: dramatic lighting, framing, colour grade, depth of field",
    "anime": "an anime illustration: line art, cel shading, vivid colours",
    "none": "no particular style: describe the scene plainly and vividly",
}

FEW_SHOT = (
    (
        "a cat sleeping on a windowsill",
        "photorealistic",
        "A ginger tabby cat curled up asleep on a sunlit wooden windowsill, soft morning light "
        "through sheer curtains, potted herbs beside it, shallow depth of field, 50mm lens, "
        "natural colours, fine fur detail",
    ),
    (
        "a lighthouse in a storm",
        "cinematic",
        "A lone white lighthouse on a jagged cliff battered by a violent storm at dusk, huge "
        "waves exploding against the rocks, its beam cutting through rain and low clouds, "
        "dramatic backlight, wide anamorphic framing, teal and amber colour grade",
    ),
    (
        "a fox in a forest",
        "anime",
        "A small red fox trotting through a glowing autumn forest, fallen maple leaves swirling "
        "around it, warm sunbeams between tall trees, clean line art, cel shading, vibrant "
        "orange and gold palette",
    ),
)

INSTRUCTION = (
    "You rewrite short prompts for a text-to-image model into one detailed prompt.\n"
    "Rules:\n"
    "- Keep the user's subject and every detail they gave; add setting, composition, "
    "lighting, colours and materials that fit.\n"
    "- Follow the requested style.\n"
    "- Put the most important words first: some image models read only the first 77 tokens.\n"
    "- Write 30 to 60 words as one comma-separated description, in English.\n"
    "- Answer with the prompt only: no preamble, no quotes, no lists, no negative prompt.\n"
    "\nExamples:\n"
    + "\n".join(
        f"Style: {style}\nPrompt: {prompt}\nAnswer: {answer}\n"
        for prompt, style, answer in FEW_SHOT
    )
)

# Openings of answers that are refusals or chatter, not prompts.
REFUSALS = re.compile(
    r"^(i'?m sorry|i am sorry|sorry|i can(?:no|')t|i cannot|as an ai|i won'?t|"
    r"i am unable|i'?m unable)",
    re.IGNORECASE,
)
PREAMBLE = re.compile(
    r"^(?:here(?:'s| is)[^:\n]*:|(?:enhanced |detailed )?prompt:|answer:)\s*", re.I
)
# Words too common to show that an answer kept the prompt's subject (short ones are ignored).
STOPWORDS = frozenset({"the", "and", "with", "for", "from", "into", "over", "under", "near", "its"})


class EnhancerError(RuntimeError):
    """An LLM call failed or answered something unusable; the message says which."""


def user_message(prompt: str, style: str) -> str:
    """The request for one prompt, in the shape of the few-shot examples."""
    hint = STYLE_HINTS.get(style, STYLE_HINTS["none"])
    return f"Style: {style} ({hint})\nPrompt: {prompt}\nAnswer:"


def _content_words(text: str) -> set[str]:
    return {
        word
        for word in re.findall(r"[a-z0-9']+", text.lower())
        if len(word) > 2 and word not in STOPWORDS
    }


def clean_answer(answer: str | None, prompt: str) -> str:
    """The usable prompt in an LLM's answer; raises EnhancerError when there is none."""
    text = (answer or "").strip()
    # Reasoning models may prepend their thinking; keep what follows it.
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL).strip()
    text = PREAMBLE.sub("", text).strip()
    text = text.strip("\"'` \n")
    text = re.sub(r"\s+", " ", text)
    if not text:
        raise EnhancerError("empty answer")
    if REFUSALS.match(text):
        raise EnhancerError(f"the model refused: {text[:120]!r}")
    if len(text) > MAX_ANSWER_CHARS:
        raise EnhancerError(f"answer too long ({len(text)} characters)")
    wanted = _content_words(prompt)
    if wanted and not wanted & _content_words(text):
        raise EnhancerError(f"answer lost the subject of the prompt: {text[:120]!r}")
    return text


@dataclass
class LLMEnhancer(ABC):
    """What the LLM enhancers share: cache, cleaning, retry policy, fallback and the breaker."""

    model: str
    cache: EnhancementCache | None = None
    # The retry policy; defaults and meaning declared once, in EnhancerSettings.
    timeout_seconds: float = _DEFAULTS["timeout_seconds"].default
    max_attempts: int = _DEFAULTS["max_attempts"].default
    initial_backoff_seconds: float = _DEFAULTS["initial_backoff_seconds"].default
    max_backoff_seconds: float = _DEFAULTS["max_backoff_seconds"].default
    method: str = field(default="llm", init=False)
    fallback: TemplateEnhancer = field(default_factory=TemplateEnhancer, init=False)
    calls: int = field(default=0, init=False)  # prompts sent to the LLM (retries not counted)
    _unavailable: str = field(default="", init=False, repr=False)  # set: the breaker is open

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")

    @abstractmethod
    def complete(self, prompt: str, style: str) -> str:
        """The raw answer of the LLM to the enhancement request for one prompt, transient
        failures retried up to ``max_attempts`` calls."""

    @abstractmethod
    def is_transient(self, exc: Exception) -> bool:
        """Whether ``complete`` retries this failure (so, when it raises it, retries are spent)."""

    @abstractmethod
    def is_unavailable(self, exc: Exception) -> bool:
        """Whether this failure means the service cannot answer at all (opens the breaker)."""

    def describe_error(self, exc: Exception) -> str:
        """A short description of a failed call."""
        return f"{type(exc).__name__}: {exc}"

    def scrub(self, text: str) -> str:
        """``text`` without any secret the enhancer holds (an API key)."""
        return text

    def backoff_seconds(self, retry: int) -> float:
        """The wait before retry number ``retry`` (1, 2, ...), as google-genai computes it:
        doubling from ``initial_backoff_seconds``, plus up to that much jitter, capped."""
        initial = self.initial_backoff_seconds
        delay = initial * 2 ** (retry - 1) + random.uniform(0.0, initial)
        return min(self.max_backoff_seconds, delay)

    def enhance(self, prompt: str, style: str, negative_prompt: str = "") -> Enhancement:
        """The LLM's prompt (cached), or the template's with the reason it fell back."""
        template = self.fallback.enhance(prompt, style, negative_prompt)
        if self.cache is not None:
            cached = self.cache.get(self.method, self.model, prompt, style)
            if cached is not None:
                return self._enhancement(cached, template)
        if self._unavailable:
            reason = f"{self.method} {self.model} not called: {self._unavailable}"
            return replace(template, fallback_reason=reason)
        try:
            self.calls += 1
            text = clean_answer(self.complete(prompt, style), prompt)
        except Exception as exc:  # any failure falls back: one prompt never stops the set
            reason = f"{self.method} {self.model} failed: {self._failure(exc)}"
            return replace(template, fallback_reason=reason)
        if self.cache is not None:
            self.cache.put(self.method, self.model, prompt, style, text)
        return self._enhancement(text, template)

    def _failure(self, exc: Exception) -> str:
        """What went wrong, for the fallback reason; opens the breaker when it must."""
        if isinstance(exc, EnhancerError):  # an unusable answer: the service itself works
            return self.scrub(str(exc))[:MAX_REASON_CHARS]
        message = self.describe_error(exc)
        if self.max_attempts > 1 and self.is_transient(exc):
            message += f" (after {self.max_attempts} attempts)"
        message = self.scrub(message)[:MAX_REASON_CHARS]
        if self.is_unavailable(exc):
            self._unavailable = f"unavailable earlier in this set ({message})"
        return message

    def _enhancement(self, text: str, template: Enhancement) -> Enhancement:
        return Enhancement(
            text=text,
            negative_prompt=template.negative_prompt,
            method=self.method,
            model=self.model,
        )


@dataclass
class GeminiTextEnhancer(LLMEnhancer):
    """Enhancement by a Gemini text model through the google-genai SDK."""

    model: str = DEFAULT_GEMINI_TEXT_MODEL
    api_key: str = field(default="", repr=False)  # never shown
    base_url: str | None = None  # another endpoint (a proxy, a test server)
    _client: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.method = "gemini"
        if not self.api_key:
            raise ValueError(
                "GEMINI_API_KEY is not set: export GEMINI_API_KEY=... (get a key at "
                "https://aistudio.google.com/apikey) or use the template or ollama enhancer"
            )

    def _get_client(self) -> genai.Client:
        if self._client is None:
            # The SDK retries transient failures itself; jitter as large as the first wait
            # keeps the SDK's default shape (1 s + up to 1 s) and lets tests use tiny waits.
            retry_options = types.HttpRetryOptions(
                attempts=self.max_attempts,
                initial_delay=self.initial_backoff_seconds,
                max_delay=self.max_backoff_seconds,
                jitter=self.initial_backoff_seconds,
                http_status_codes=list(RETRYABLE_STATUS_CODES),
            )
            self._client = make_gemini_client(
                self.api_key,
                base_url=self.base_url,
                timeout_seconds=self.timeout_seconds,
                retry_options=retry_options,
            )
        return self._client

    def complete(self, prompt: str, style: str) -> str:
        config = types.GenerateContentConfig(
            system_instruction=INSTRUCTION,
            temperature=0.4,
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
        )
        response = self._get_client().models.generate_content(
            model=self.model, contents=user_message(prompt, style), config=config
        )
        feedback = response.prompt_feedback
        if feedback is not None and feedback.block_reason:
            raise EnhancerError(f"prompt blocked ({feedback.block_reason})")
        texts = [
            part.text
            for candidate in (response.candidates or [])[:1]
            for part in ((candidate.content.parts if candidate.content else None) or [])
            if part.text and not part.thought
        ]
        return "".join(texts)

    def is_transient(self, exc: Exception) -> bool:
        # Exactly what the SDK's HttpRetryOptions retries.
        if isinstance(exc, genai_errors.APIError):
            return exc.code in RETRYABLE_STATUS_CODES
        return isinstance(exc, SDK_RETRIED_ERRORS)

    def is_unavailable(self, exc: Exception) -> bool:
        if isinstance(exc, CONNECT_ERRORS):
            return True
        if not isinstance(exc, genai_errors.APIError):
            return False
        details = error_details(exc)
        return (
            exc.code in UNAVAILABLE_STATUS_CODES
            or "API_KEY_INVALID" in error_reasons(details)  # Gemini answers a bad key with 400
            or (exc.code == 429 and bool(daily_quota_ids(details)))  # back after midnight PT
        )

    def describe_error(self, exc: Exception) -> str:
        if isinstance(exc, genai_errors.APIError):
            text = f"HTTP {exc.code} {exc.status or ''}: {exc.message or ''}".strip()
            quotas = daily_quota_ids(error_details(exc)) if exc.code == 429 else []
            if quotas:
                text = f"daily quota exhausted ({', '.join(quotas)}): {text}"
        elif isinstance(exc, CONNECT_ERRORS):
            where = self.base_url or "the Gemini API"
            text = f"cannot reach {where} ({type(exc).__name__}: {exc})"
        elif "timeout" in type(exc).__name__.lower():
            text = f"timed out after {self.timeout_seconds:g} s"
        else:
            text = f"{type(exc).__name__}: {exc}"
        return self.scrub(text)

    def scrub(self, text: str) -> str:
        return redact(text, self.api_key)


@dataclass
class OllamaEnhancer(LLMEnhancer):
    """Enhancement by a local Ollama model through its REST API (POST /api/generate)."""

    model: str = DEFAULT_OLLAMA_MODEL
    base_url: str = DEFAULT_OLLAMA_BASE_URL

    def __post_init__(self) -> None:
        super().__post_init__()
        self.method = "ollama"

    def complete(self, prompt: str, style: str) -> str:
        # urllib has no retry policy of its own: this loop is the one HttpRetryOptions gives
        # the Gemini enhancer.
        attempt = 1
        while True:
            try:
                return self._generate(prompt, style)
            except Exception as exc:
                if attempt >= self.max_attempts or not self.is_transient(exc):
                    raise
            time.sleep(self.backoff_seconds(attempt))
            attempt += 1

    def _generate(self, prompt: str, style: str) -> str:
        """One POST /api/generate."""
        payload = {
            "model": self.model,
            "prompt": user_message(prompt, style),
            "system": INSTRUCTION,
            "stream": False,
            "options": {"temperature": 0.4},
        }
        request = urllib.request.Request(
            f"{self.base_url.rstrip('/')}/api/generate",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
            raw = response.read()
        try:
            body = json.loads(raw)
        except ValueError:
            raise EnhancerError(f"answer is not JSON: {raw[:80]!r}") from None
        if not isinstance(body, dict) or not isinstance(body.get("response"), str):
            raise EnhancerError("answer has no 'response' text")
        return body["response"]

    def is_transient(self, exc: Exception) -> bool:
        # A refused connection is not retried: Ollama runs locally, so it means "not running".
        if isinstance(exc, urllib.error.HTTPError):
            return exc.code in RETRYABLE_STATUS_CODES
        return isinstance(exc, TimeoutError)  # the answer did not come in time

    def is_unavailable(self, exc: Exception) -> bool:
        if isinstance(exc, urllib.error.HTTPError):  # an answer: the server is up
            return exc.code in UNAVAILABLE_STATUS_CODES
        # urlopen wraps every failure to connect (refused, unknown host, connect timeout).
        return isinstance(exc, urllib.error.URLError)

    def describe_error(self, exc: Exception) -> str:
        if isinstance(exc, urllib.error.HTTPError):
            try:
                detail = json.loads(exc.read()).get("error", "")
            except (ValueError, AttributeError, OSError):
                detail = ""
            return f"HTTP {exc.code}: {detail or exc.reason}"
        if isinstance(exc, urllib.error.URLError):
            return f"cannot reach Ollama at {self.base_url} ({exc.reason}); is `ollama serve` up?"
        if isinstance(exc, TimeoutError):
            return f"timed out after {self.timeout_seconds:g} s"
        return f"{type(exc).__name__}: {exc}"


__all__ = [
    "DEFAULT_GEMINI_TEXT_MODEL",
    "DEFAULT_OLLAMA_BASE_URL",
    "DEFAULT_OLLAMA_MODEL",
    "EnhancementCache",
    "EnhancerError",
    "GeminiTextEnhancer",
    "LLMEnhancer",
    "OllamaEnhancer",
    "clean_answer",
]
