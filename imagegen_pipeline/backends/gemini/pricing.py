"""What one Gemini answer cost, from the token counts in its usage metadata.

Prices come from the one table, ``prices.py`` (per model, with its source date), under any
price set on the resource; batch mode pays ``BATCH_DISCOUNT`` of every token. Output is priced
per modality: an image token costs 12 times a text token for gemini-2.5-flash-image, and
thinking is billed as text output, so the answer's per-modality breakdown is used when it has
one.
"""

from __future__ import annotations

from typing import Any

from google.genai import types

from imagegen_pipeline.backends.gemini.settings import GeminiSettings


def enum_name(value: Any) -> str:
    """An SDK enum's name ("IMAGE_SAFETY"), or the raw string when the SDK kept one, or ""."""
    if value is None:
        return ""
    return str(getattr(value, "value", value))


def usage_cost(
    usage: types.GenerateContentResponseUsageMetadata | None, settings: GeminiSettings
) -> tuple[int | None, int | None, float | None]:
    """(prompt tokens, output tokens, cost in USD) of one answer; Nones without usage data."""
    if usage is None:
        return None, None, None
    prompt_tokens = usage.prompt_token_count or 0
    candidates_tokens = usage.candidates_token_count or 0
    thoughts_tokens = usage.thoughts_token_count or 0
    image_tokens = candidates_tokens
    text_tokens = thoughts_tokens  # thinking is billed as text output
    if usage.candidates_tokens_details:
        # Per-modality counts: image tokens at the image price, the rest at the text price.
        image_tokens = sum(
            detail.token_count or 0
            for detail in usage.candidates_tokens_details
            if enum_name(detail.modality) == "IMAGE"
        )
        text_tokens += candidates_tokens - image_tokens
    price = settings.prices()
    cost = settings.price_factor * (
        prompt_tokens * price.input_per_token
        + image_tokens * price.image_output_per_token
        + text_tokens * price.text_output_per_token
    )
    return prompt_tokens, candidates_tokens + thoughts_tokens, cost
