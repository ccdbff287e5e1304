"""CLIP token counts without torch: the same counts as open_clip's own tokenizer."""

from __future__ import annotations

import random
import subprocess
import sys

from open_clip.tokenizer import SimpleTokenizer

from imagegen_pipeline.text_encoders import count_clip_tokens
from tests.conftest import PROJECT_ROOT

HAND_PICKED = [
    "",
    " ",
    "a cat",
    "A CAT, sleeping; on the sunny windowsill!!!",
    "it's DON'T we'll they've I'm you'd she'S",
    "photorealistic, 8k, ultra-detailed, f/1.8, 35mm, --ar 16:9 (masterpiece:1.2) [blurry]",
    "café crème brûlée, naïve façade, Ærøskøbing, straße, İstanbul",
    "cafÃ© mojibake fixed by ftfy, &amp;amp; &lt;b&gt; &quot;html&quot; &#39;entities&#39;",
    "中文提示词：一只猫在窗台上睡觉。日本語のテキスト、한국어 텍스트",
    "नमस्ते दुनिया, مرحبا بالعالم, שלום עולם, Привет мир, Γειά σου Κόσμε",
    "emoji 🙂🐈‍⬛👩🏽‍🚀🇫🇷 and symbols ™©®°±×÷≠≤≥∞€£¥",
    "combining e\u0301 a\u0300 n\u0303, zero\u200bwidth, soft\u00adhyphen, nbsp\u00a0space",
    "tabs\tnew\nlines\r\nand   many    spaces",
    "numbers 1234567890 3.14159 1,000,000 ١٢٣ ४५६ ½ ² ⅷ",
    "<start_of_text> literal specials <end_of_text> x!<end_of_text> <START_OF_TEXT>",
    "a" * 500,
    "supercalifragilisticexpialidocious antidisestablishmentarianism " * 20,
    "!!!???...,,,;;;:::---___===+++***&&&^^^%%%$$$###@@@~~~```|||\\\\///",
]

POOLS = [
    "abcdefghijklmnopqrstuvwxyz",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    " " * 8 + "\t\n",
    ".,;:!?'\"()[]{}<>-_/\\|@#$%^&*+=~`",
    "éèêëàâäôöûüçñßøåæœÉÀÇ",
    "中文日本語한국어",
    "абвгдеёжзийклмнопрстуфхцчшщъыьэюя",
    "αβγδεζηθικλμνξοπρστυφχψω",
    "नमस्तेदुनिया",
    "🙂🐈🚀🎨✨",
    "\u0301\u0300\u200b\u00a0",
]
WORDS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "&amp;", "&lt;", "Ã©", "cat", "the"]


def random_prompts(count: int, seed: int = 20) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        length = rng.choice([5, 20, 80, 300, 1500])
        parts = []
        while sum(map(len, parts)) < length:
            if rng.random() < 0.1:
                parts.append(rng.choice(WORDS))
            else:
                pool = rng.choice(POOLS)
                parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 12))))
        prompts.append("".join(parts))
    return prompts


def test_counts_match_open_clip_tokenizer():
    reference = SimpleTokenizer()
    prompts = HAND_PICKED + random_prompts(600)
    mismatches = [
        (prompt, count_clip_tokens(prompt), len(reference.encode(prompt)) + 2)
        for prompt in prompts
        if count_clip_tokens(prompt) != len(reference.encode(prompt)) + 2
    ]
    assert not mismatches, mismatches[:5]


def test_counting_imports_neither_torch_nor_open_clip():
    code = (
        "import sys\n"
        "from imagegen_pipeline.text_encoders import count_clip_tokens\n"
        "assert count_clip_tokens('a cat on a mat') == 7\n"
        "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PROJECT_ROOT,
        env={"PYTHONPATH": str(PROJECT_ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
