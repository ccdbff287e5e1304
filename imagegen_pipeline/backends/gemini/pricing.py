"""What one Gemini answer cost, from the token counts in its usage metadata.

Prices are settings (``GeminiSettings.price_per_*``, Google's list prices by default) because
they change and differ per model. Output is priced per modality: an image token costs 12 times a
text token for gemini-2.5-flash-image, and thinking is billed as text output, so the answer's
per-modality breakdown is used when it has one.
"""

from __future__ import annotations

from typing import Any

from google.genai import types

from imagegen_pipeline.backends.gemini.settings import GeminiSettings

# Output tokens of one image up to 1024x1024 px: at $30 per 1M tokens, about $0.039 an image
# (the default of GeminiSettings.price_per_image_usd, which the budget reserves per request).
TOKENS_PER_IMAGE = 1290


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
    cost = (
        prompt_tokens * settings.price_per_input_token_usd
        + image_tokens * settings.price_per_output_token_usd
        + text_tokens * settings.price_per_output_text_token_usd
    )
    return prompt_tokens, candidates_tokens + thoughts_tokens, cost
