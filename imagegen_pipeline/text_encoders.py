"""How many tokens the models' text encoders read, and how many a prompt takes.

Prompts longer than an encoder's context are cut off by its tokenizer; the pipeline keeps them
and flags them instead, so a user sees which words a model never read.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

CLIP_TOKEN_LIMIT = 77  # FLUX's CLIP-L, both SDXL encoders, open_clip scoring
T5_TOKEN_LIMIT = 256  # FLUX.1-schnell's T5-XXL, as called with max_sequence_length=256


@cache
def clip_tokenizer() -> Any:
    """open_clip's CLIP BPE tokenizer (its vocabulary ships with the package: no download)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def count_clip_tokens(text: str) -> int:
    """CLIP BPE tokens in ``text``, start and end tokens included (the 77 limit counts them)."""
    return len(clip_tokenizer().encode(text)) + 2


def estimate_t5_tokens(text: str) -> int:
    """T5 sentencepiece tokens in ``text``, estimated (the T5 vocabulary is not shipped).

    Sentencepiece splits English into about 1.3 pieces per word, punctuation apart; the end
    token is counted, as the 256 limit counts it.
    """
    words = re.findall(r"\w+", text)
    punctuation = re.findall(r"[^\w\s]", text)
    return round(1.3 * len(words)) + len(punctuation) + 1
