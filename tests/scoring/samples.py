"""What the scorer tests share: noise pictures of different sizes, state-dict layouts, and the
check that a scorer is sized before it loads."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from PIL import Image


def noise(count: int) -> list[Image.Image]:
    """``count`` noise pictures, each of another size and brightness."""
    rng = np.random.default_rng(3)
    return [
        Image.fromarray(rng.integers(60 * i, 256, (80, 96 + 8 * i, 3), dtype=np.uint8))
        for i in range(count)
    ]


def shapes(state: dict) -> set[str]:
    """State-dict key patterns, layer numbers blanked: the layout without the depth."""
    return {re.sub(r"\.\d+\.", ".N.", key) for key in state}


def assert_sized_before_load(scorer: Any) -> int:
    """A fresh copy of ``scorer`` plans its weights' bytes before loading, within 1 % of what
    the loaded model holds (the module adds only a few non-persistent buffers); returns the
    planned bytes. What lets the images step place a scorer beside the generator."""
    fresh = type(scorer)(scorer.config, model_id=scorer.model_id)
    planned = fresh.planned_weight_bytes()
    assert fresh.model is None and planned is not None
    fresh.load()
    assert planned <= fresh.weight_bytes() <= planned * 1.01
    return planned
