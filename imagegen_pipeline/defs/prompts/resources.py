"""How prompts are enhanced, per prompt set."""

import os
from typing import Any

import dagster as dg
from pydantic import Field

from imagegen_pipeline.enhancement import PromptEnhancer, TemplateEnhancer
from imagegen_pipeline.enhancement.llm import (
    DEFAULT_GEMINI_TEXT_MODEL,
    DEFAULT_OLLAMA_BASE_URL,
    DEFAULT_OLLAMA_MODEL,
    EnhancementCache,
    GeminiTextEnhancer,
    OllamaEnhancer,
)
from imagegen_pipeline.storage import Storage


class PromptEnhancerResource(dg.ConfigurableResource):
    """Which enhancer each prompt set uses: "template" (offline), "gemini" or "ollama"."""

    default_method: str = "template"  # used for prompt sets not named in method_by_prompt_set
    method_by_prompt_set: dict[str, str] = {}  # noqa: RUF012 - e.g. {"product_shots": "gemini"}
    # None: GEMINI_API_KEY, read when the step starts, so a run config that sets another field
    # cannot drop it and it is never stored with the run; repr=False keeps it out of reprs.
    gemini_api_key: str | None = Field(default=None, repr=False)
    gemini_text_model: str = DEFAULT_GEMINI_TEXT_MODEL  # the Gemini model that rewrites prompts
    gemini_base_url: str | None = None  # another endpoint (a proxy, a test server)
    ollama_base_url: str = DEFAULT_OLLAMA_BASE_URL  # where `ollama serve` listens
    ollama_model: str = DEFAULT_OLLAMA_MODEL  # a model pulled into Ollama (`ollama pull ...`)
    timeout_seconds: float = 60.0  # one LLM call; a timed-out call is retried like a 429
    max_attempts: int = 5  # calls per prompt on 408/429/5xx and timeouts, then the template
    initial_backoff_seconds: float = 1.0  # the wait before the first retry (doubling, jittered)
    max_backoff_seconds: float = 60.0  # ceiling of that wait
    cache_dir: str | None = None  # cached LLM answers; None: <storage>/cache/enhancements

    def method_for(self, prompt_set: str) -> str:
        """The enhancement method configured for ``prompt_set``."""
        return self.method_by_prompt_set.get(prompt_set, self.default_method)

    def _calls(self, cache: EnhancementCache) -> dict[str, Any]:
        return {
            "cache": cache,
            "timeout_seconds": self.timeout_seconds,
            "max_attempts": self.max_attempts,
            "initial_backoff_seconds": self.initial_backoff_seconds,
            "max_backoff_seconds": self.max_backoff_seconds,
        }

    def create_enhancer(self, prompt_set: str, storage: Storage) -> PromptEnhancer:
        """The enhancer for ``prompt_set``; LLM answers are cached under the storage."""
        method = self.method_for(prompt_set)
        if method == "template":
            return TemplateEnhancer()
        folder = Storage(self.cache_dir) if self.cache_dir else storage
        cache = EnhancementCache(
            folder.path("cache", "enhancements") if not self.cache_dir else folder.base
        )
        if method == "gemini":
            return GeminiTextEnhancer(
                model=self.gemini_text_model,
                api_key=self.gemini_api_key or os.getenv("GEMINI_API_KEY", ""),
                base_url=self.gemini_base_url,
                **self._calls(cache),
            )
        if method == "ollama":
            return OllamaEnhancer(
                model=self.ollama_model, base_url=self.ollama_base_url, **self._calls(cache)
            )
        raise ValueError(f"unknown enhancement method {method!r} for prompt set {prompt_set!r}")
