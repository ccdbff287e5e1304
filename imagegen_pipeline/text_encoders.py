"""How many tokens the models' text encoders read, and how many a prompt takes.

Prompts longer than an encoder's context are cut off by its tokenizer; the pipeline keeps them
and flags them instead, so a user sees which words a model never read.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import re
from functools import cache
from pathlib import Path
from typing import Any

CLIP_TOKEN_LIMIT = 77  # FLUX's CLIP-L, both SDXL encoders, open_clip scoring
T5_TOKEN_LIMIT = 256  # FLUX.1-schnell's T5-XXL, as called with max_sequence_length=256


CLIP_VOCABULARY = "bpe_simple_vocab_16e6.txt.gz"  # CLIP's BPE merges, shipped inside open_clip
CLIP_MERGES = 49152 - 256 - 2  # the merges CLIP uses: its vocabulary less bytes and specials
CLIP_SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
# CLIP's pre-tokenizer (open_clip.tokenizer.SimpleTokenizer), to the character.
CLIP_WORDS = "|".join(CLIP_SPECIAL_TOKENS) + (
    r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def clip_vocabulary_path() -> Path:
    """open_clip's copy of CLIP's BPE file, found without importing open_clip (which imports
    torch: over a gigabyte and seconds of CPU only to count tokens)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip is not installed: it ships CLIP's BPE vocabulary")
    return Path(next(iter(spec.submodule_search_locations))) / CLIP_VOCABULARY


def _byte_symbols() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters, in CLIP's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


@cache
def _clip_bpe() -> tuple[Any, dict[int, str], Any]:
    """CLIP's BPE as a ``tokenizers`` model, the byte-to-symbol map its words go through, and
    its word pattern."""
    import regex
    from tokenizers.models import BPE

    with gzip.open(clip_vocabulary_path(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")[1 : CLIP_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(_byte_symbols().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab = {token: i for i, token in enumerate([*tokens, *CLIP_SPECIAL_TOKENS])}
    model = BPE(vocab, merges, end_of_word_suffix="</w>")
    return model, _byte_symbols(), regex.compile(CLIP_WORDS, regex.IGNORECASE)


def _clean_like_clip(text: str) -> str:
    """CLIP's text clean-up before tokenizing: mojibake fixed, HTML entities undone, spaces
    collapsed, lower case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def count_clip_tokens(text: str) -> int:
    """CLIP BPE tokens in ``text``, start and end tokens included (the 77 limit counts them).

    The count open_clip's tokenizer gives, without torch: the same clean-up and word split,
    and CLIP's merges run by the ``tokenizers`` library.
    """
    model, byte_symbols, words = _clip_bpe()
    count = 2
    for word in words.findall(_clean_like_clip(text)):
        if word in CLIP_SPECIAL_TOKENS:
            count += 1
        else:
            count += len(model.tokenize("".join(byte_symbols[b] for b in word.encode())))
    return count


def estimate_t5_tokens(text: str) -> int:
    """T5 sentencepiece tokens in ``text``, estimated (the T5 vocabulary is not shipped).

    Sentencepiece splits English into about 1.3 pieces per word, punctuation apart; the end
    token is counted, as the 256 limit counts it.
    """
    words = re.findall(r"\w+", text)
    punctuation = re.findall(r"[^\w\s]", text)
    return round(1.3 * len(words)) + len(punctuation) + 1
