"""Prompt enhancement: a template enhancer and LLM enhancers behind one protocol."""

from __future__ import annotations

import pandas as pd

from imagegen_pipeline.enhancement.base import Enhancement, PromptEnhancer, rate_prompt
from imagegen_pipeline.enhancement.cache import EnhancementCache
from imagegen_pipeline.enhancement.template import TemplateEnhancer
from imagegen_pipeline.model_settings import EnhancerSettings
from imagegen_pipeline.project_config import api_key
from imagegen_pipeline.records import PROMPT_COLUMNS
from imagegen_pipeline.storage import Storage
from imagegen_pipeline.text_encoders import (
    CLIP_TOKEN_LIMIT,
    T5_TOKEN_LIMIT,
    count_clip_tokens,
    estimate_t5_tokens,
)

__all__ = [
    "Enhancement",
    "PromptEnhancer",
    "TemplateEnhancer",
    "create_enhancer",
    "enhance_prompts",
]

# Every column of the validated prompt table but the prompt itself, which enhancement rewrites.
PASSTHROUGH_COLUMNS = tuple(
    column
    for column in PROMPT_COLUMNS
    if column not in ("prompt_id", "prompt", "negative_prompt", "prompt_truncated_by_encoders")
)
ENHANCED_COLUMNS = (
    "prompt_id",
    "original_prompt",
    "enhanced_prompt",
    "negative_prompt",
    "method",
    "model",
    "fallback_reason",
    "prompt_score",
    "prompt_issues",
    "clip_tokens",
    "clip_truncated",
    "t5_tokens_estimate",
    "t5_truncated",
    *PASSTHROUGH_COLUMNS,
)


def create_enhancer(
    settings: EnhancerSettings, prompt_set: str, storage: Storage
) -> PromptEnhancer:
    """The enhancer ``settings`` choose for ``prompt_set``; LLM answers cached under storage."""
    method = settings.method_by_prompt_set.get(prompt_set, settings.default_method)
    if method == "template":
        return TemplateEnhancer()
    # Only now: the SDK clients take a second to import, and most sets use the template.
    from imagegen_pipeline.enhancement.llm import (
        INSTRUCTION_VERSION,
        GeminiTextEnhancer,
        OllamaEnhancer,
    )

    cache_folder = (
        Storage(settings.cache_dir).base
        if settings.cache_dir
        else storage.path("cache", "enhancements")
    )
    calls = {
        "cache": EnhancementCache(cache_folder, INSTRUCTION_VERSION),
        "timeout_seconds": settings.timeout_seconds,
        "max_attempts": settings.max_attempts,
        "initial_backoff_seconds": settings.initial_backoff_seconds,
        "max_backoff_seconds": settings.max_backoff_seconds,
    }
    if method == "gemini":
        return GeminiTextEnhancer(
            model=settings.gemini_text_model,
            api_key=settings.gemini_api_key or api_key("GEMINI_API_KEY") or "",
            base_url=settings.gemini_base_url,
            **calls,
        )
    if method == "ollama":
        return OllamaEnhancer(
            model=settings.ollama_model, base_url=settings.ollama_base_url, **calls
        )
    raise ValueError(f"unknown enhancement method {method!r} for prompt set {prompt_set!r}")


def enhance_prompts(prompts: pd.DataFrame, enhancer: PromptEnhancer) -> pd.DataFrame:
    """One enhanced row per validated prompt row, with its rating and token counts."""
    rows = []
    for prompt in prompts.to_dict("records"):
        result = enhancer.enhance(prompt["prompt"], prompt["style"], prompt["negative_prompt"])
        rating = rate_prompt(prompt["prompt"])
        clip_tokens = count_clip_tokens(result.text)
        t5_tokens = estimate_t5_tokens(result.text)
        rows.append(
            {
                "prompt_id": prompt["prompt_id"],
                "original_prompt": prompt["prompt"],
                "enhanced_prompt": result.text,
                "negative_prompt": result.negative_prompt,
                "method": result.method,
                "model": result.model,
                "fallback_reason": result.fallback_reason,
                "prompt_score": rating.score,
                "prompt_issues": rating.issues,
                "clip_tokens": clip_tokens,
                "clip_truncated": clip_tokens > CLIP_TOKEN_LIMIT,
                "t5_tokens_estimate": t5_tokens,
                "t5_truncated": t5_tokens > T5_TOKEN_LIMIT,
                # .get: tables validated before a column existed lack it (lora, control_*)
                **{column: prompt.get(column, "") for column in PASSTHROUGH_COLUMNS},
            }
        )
    table = pd.DataFrame(rows, columns=list(ENHANCED_COLUMNS))
    for column in ("seed", "width", "height"):
        table[column] = table[column].astype("Int64")
    for column in ("candidates", "select"):  # "" in tables validated before they existed
        table[column] = pd.to_numeric(table[column], errors="coerce").astype("Int64")
    table["min_score"] = pd.to_numeric(table["min_score"], errors="coerce").astype("float64")
    return table
