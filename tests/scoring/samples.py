"""What the scorer tests share: noise pictures of different sizes, and state-dict layouts."""

from __future__ import annotations

import re

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
