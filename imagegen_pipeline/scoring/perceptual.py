"""Cheap pixel statistics of an image, and blank detection; numpy and Pillow only.

All values are on fixed scales so they compare across images of any size and backend:

- ``brightness``: mean luminance (ITU-R 601 luma, Pillow's "L"), 0 black to 1 white.
- ``contrast``: standard deviation of that luminance, 0 to 0.5.
- ``saturation``: mean HSV saturation, 0 grey to 1 fully saturated (from a pixel sample).
- ``sharpness``: variance of the 4-neighbour Laplacian of the luminance in 0-255 units; blurry
  images score low (tens), detailed ones high (thousands). Measured on the luminance averaged
  over k x k pixel blocks, ``k = longer side // SHARPNESS_SIDE`` (1 below 1024 px, 2 from 1024
  to 1535 px, ...), so the 1024 px images of one model and the 512 px images of another are
  measured at about the same scale. This also makes it four times cheaper on a 1024 px image.
  Before the block averaging (``METRICS_VERSION`` 1), images of 1024 px and more were measured
  at full resolution, which gives them higher values; the quality step's score keys include
  ``METRICS_VERSION``, so a report never mixes values of both.
- ``dominant_colour_share``: share of pixels in the most common colour, with colours quantised
  to 32 levels per channel so that faint noise or dithering does not hide a flat image.
  Estimated from a regular grid of about ``SAMPLE_PIXELS`` pixels (every k-th row and column,
  no blending, so pixel values are exact): within a few tenths of a percent of the full count,
  at a fraction of the cost on a 1024 px image.
- ``is_blank``: nearly uniform, i.e. luminance std below ``max_luminance_std`` or one colour
  covering more than ``max_dominant_share`` of the pixels. This catches the black images safety
  filters return, solid fills and failed decodes, while a two-tone checkerboard or a gradient
  passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

QUANTISE_BITS = 5  # 32 levels per channel: 32768 colour bins, fast to count
SAMPLE_PIXELS = 16_384  # grid sample for the colour statistics
SHARPNESS_SIDE = 512  # sharpness is measured on block averages that leave 512-1023 px
METRICS_VERSION = 2  # raised when a metric's meaning changes (2: sharpness on block averages)


@dataclass(frozen=True)
class BlankThresholds:
    """When an image counts as blank."""

    max_luminance_std: float = 0.02  # about 5 of 255 grey levels: no visible structure
    max_dominant_share: float = 0.98  # one (quantised) colour covers nearly every pixel


DEFAULT_BLANK_THRESHOLDS = BlankThresholds()


def laplacian_variance(luminance: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of a 2-D array (edges excluded)."""
    if min(luminance.shape) < 3:
        return 0.0
    # In place: one temporary the size of the image instead of five.
    laplacian = luminance[:-2, 1:-1] + luminance[2:, 1:-1]
    laplacian += luminance[1:-1, :-2]
    laplacian += luminance[1:-1, 2:]
    laplacian -= 4 * luminance[1:-1, 1:-1]
    return float(laplacian.var(dtype=np.float64))


def sharpness(grey: Image.Image) -> float:
    """Laplacian variance of a luminance image, on its k x k block averages (module docstring)."""
    factor = max(1, max(grey.size) // SHARPNESS_SIDE)
    blocks = grey.reduce(factor) if factor > 1 else grey
    return laplacian_variance(np.asarray(blocks, dtype=np.float32))


def dominant_colour_share(rgb: np.ndarray) -> float:
    """Share of pixels in the most common colour, at 32 levels per channel."""
    quantised = (rgb >> (8 - QUANTISE_BITS)).astype(np.uint16)
    codes = (quantised[..., 0] << (2 * QUANTISE_BITS)) | (quantised[..., 1] << QUANTISE_BITS)
    codes |= quantised[..., 2]
    counts = np.bincount(codes.ravel(), minlength=1 << (3 * QUANTISE_BITS))
    return float(counts.max() / codes.size)


def perceptual_metrics(
    image: Image.Image, thresholds: BlankThresholds = DEFAULT_BLANK_THRESHOLDS
) -> dict[str, Any]:
    """Brightness, contrast, saturation, sharpness, dominant colour share and the blank flag."""
    rgb_image = image if image.mode == "RGB" else image.convert("RGB")
    grey = rgb_image.convert("L")
    # Mean and std from the 256-bin histogram: exact, and cheaper than two passes over pixels.
    levels = np.arange(256, dtype=np.float64)
    histogram = np.asarray(grey.histogram(), dtype=np.float64)
    brightness = float(histogram @ levels / histogram.sum())
    contrast = float(np.sqrt(histogram @ (levels - brightness) ** 2 / histogram.sum()) / 255.0)
    # Nearest-neighbour resizing picks a regular grid of pixels, values untouched.
    width, height = rgb_image.size
    step = max(1, round(np.sqrt(width * height / SAMPLE_PIXELS)))
    sample = rgb_image.resize(
        (max(1, width // step), max(1, height // step)), Image.Resampling.NEAREST
    )
    dominant = dominant_colour_share(np.asarray(sample))
    saturation = np.asarray(sample.convert("HSV"))[..., 1]
    return {
        "brightness": brightness / 255.0,
        "contrast": contrast,
        "saturation": float(saturation.mean() / 255.0),
        "sharpness": sharpness(grey),
        "dominant_colour_share": dominant,
        "is_blank": bool(
            contrast < thresholds.max_luminance_std or dominant > thresholds.max_dominant_share
        ),
    }
