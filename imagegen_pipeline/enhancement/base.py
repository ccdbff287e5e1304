"""What every prompt enhancer returns, and the checks run on every prompt whatever enhanced it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

from imagegen_pipeline.text_encoders import CLIP_TOKEN_LIMIT, count_clip_tokens

GENERIC_WORDS = frozenset(
    [
        "nice",
        "beautiful",
        "good",
        "great",
        "cool",
        "amazing",
        "awesome",
        "stuff",
        "thing",
        "things",
        "something",
        "picture",
        "image",
    ]
)
# Pairs of words that pull an image two ways at once.
CONTRADICTIONS = (
    ("day", "night"),
    ("black and white", "colorful"),
    ("minimalist", "intricate"),
    ("photorealistic", "cartoon"),
    ("realistic", "anime"),
    ("empty", "crowded"),
    ("sunny", "rainy"),
)
MIN_WORDS = 4


@dataclass(frozen=True)
class Enhancement:
    """An enhanced prompt and how it was made."""

    text: str
    negative_prompt: str
    method: str  # "template", "gemini", "ollama"
    model: str = ""  # the LLM that wrote it; empty for the template enhancer
    fallback_reason: str = ""  # why an LLM enhancer fell back to the template, if it did


class PromptEnhancer(Protocol):
    """Turns a short prompt into a detailed one for image models, keeping its subject."""

    method: str
    model: str

    def enhance(self, prompt: str, style: str, negative_prompt: str = "") -> Enhancement:
        """Enhance one prompt in ``style``; a user's negative prompt is kept."""
        ...


@dataclass(frozen=True)
class PromptRating:
    """A 0-100 rating of how well a prompt is written, and what cost it points."""

    score: int
    issues: list[str] = field(default_factory=list)


def _contains(text: str, phrase: str) -> bool:
    return re.search(rf"\b{re.escape(phrase)}\b", text) is not None


def rate_prompt(prompt: str) -> PromptRating:
    """Rate a user's prompt: too short, too long, generic words, contradictions."""
    lowered = prompt.lower()
    words = re.findall(r"[a-z0-9']+", lowered)
    issues: list[str] = []
    score = 100
    if len(words) < MIN_WORDS:
        issues.append(f"too short ({len(words)} words; describe subject, setting and mood)")
        score -= 30
    if count_clip_tokens(prompt) > CLIP_TOKEN_LIMIT:
        issues.append(f"too long (over {CLIP_TOKEN_LIMIT} CLIP tokens; the end is cut off)")
        score -= 15
    generic = sorted({word for word in words if word in GENERIC_WORDS})
    if generic:
        issues.append(f"generic words: {', '.join(generic)}")
        score -= min(30, 10 * len(generic))
    for first, second in CONTRADICTIONS:
        if _contains(lowered, first) and _contains(lowered, second):
            issues.append(f"contradiction: {first!r} and {second!r}")
            score -= 20
    return PromptRating(score=max(score, 0), issues=issues)
