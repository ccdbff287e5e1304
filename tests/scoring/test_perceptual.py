"""Pixel statistics and blank detection on crafted images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from imagegen_pipeline.scoring.perceptual import (
    BlankThresholds,
    dominant_colour_share,
    laplacian_variance,
    perceptual_metrics,
)

SIDE = 128


def solid(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (SIDE, SIDE), colour)


def gradient() -> Image.Image:
    row = np.linspace(0, 255, SIDE).astype(np.uint8)
    return Image.fromarray(np.tile(row, (SIDE, 1))).convert("RGB")


def noise(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))


def checkerboard(cell: int = 8) -> Image.Image:
    ys, xs = np.indices((SIDE, SIDE))
    board = (((xs // cell) + (ys // cell)) % 2 * 255).astype(np.uint8)
    return Image.fromarray(board).convert("RGB")


@pytest.mark.parametrize("colour", [(0, 0, 0), (255, 255, 255), (128, 128, 128), (200, 30, 30)])
def test_solid_images_are_blank(colour):
    metrics = perceptual_metrics(solid(colour))
    assert metrics["is_blank"] is True
    assert metrics["contrast"] == 0.0 and metrics["dominant_colour_share"] == 1.0
    assert metrics["sharpness"] == 0.0


def test_faint_noise_on_a_flat_image_is_still_blank():
    rng = np.random.default_rng(1)
    flat = np.clip(100 + rng.integers(-2, 3, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
    metrics = perceptual_metrics(Image.fromarray(flat))
    assert metrics["is_blank"] is True and metrics["contrast"] < 0.02


def test_a_black_frame_with_a_few_stars_counts_as_blank():
    pixels = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
    pixels[::10, ::10] = 255  # 1.7% of the pixels: luminance std is high, yet nothing is there
    metrics = perceptual_metrics(Image.fromarray(pixels))
    assert metrics["contrast"] > 0.02  # the std rule alone would miss it
    assert metrics["dominant_colour_share"] > 0.98 and metrics["is_blank"] is True


@pytest.mark.parametrize("make", [gradient, noise, checkerboard])
def test_images_with_structure_are_not_blank(make):
    metrics = perceptual_metrics(make())
    assert metrics["is_blank"] is False
    assert metrics["contrast"] > 0.1


def test_checkerboard_and_noise_are_sharp_and_blur_lowers_sharpness():
    board = perceptual_metrics(checkerboard())
    assert board["dominant_colour_share"] == pytest.approx(0.5)
    blurred = perceptual_metrics(checkerboard().filter(ImageFilter.GaussianBlur(3)))
    assert board["sharpness"] > 10 * blurred["sharpness"] > 0
    assert perceptual_metrics(noise())["sharpness"] > perceptual_metrics(gradient())["sharpness"]


def test_brightness_and_saturation_scales():
    assert perceptual_metrics(solid((0, 0, 0)))["brightness"] == 0.0
    assert perceptual_metrics(solid((255, 255, 255)))["brightness"] == 1.0
    assert perceptual_metrics(solid((255, 0, 0)))["saturation"] == 1.0
    assert perceptual_metrics(solid((90, 90, 90)))["saturation"] == 0.0
    assert perceptual_metrics(gradient())["brightness"] == pytest.approx(0.5, abs=0.01)


def test_thresholds_are_configurable():
    soft = np.tile(np.linspace(90, 150, SIDE).astype(np.uint8), (SIDE, 1))  # a dim haze
    image = Image.fromarray(soft).convert("RGB")
    metrics = perceptual_metrics(image)
    assert metrics["is_blank"] is False and 0.05 < metrics["contrast"] < 0.1
    assert perceptual_metrics(image, BlankThresholds(max_luminance_std=0.1))["is_blank"] is True
    assert perceptual_metrics(image, BlankThresholds(max_dominant_share=0.1))["is_blank"] is True


def test_helpers_on_arrays():
    assert laplacian_variance(np.zeros((2, 2))) == 0.0
    impulse = np.zeros((5, 5))
    impulse[2, 2] = 1.0
    assert laplacian_variance(impulse) > 0
    halves = np.zeros((4, 4, 3), dtype=np.uint8)
    halves[:, :2] = 255
    assert dominant_colour_share(halves) == 0.5


def photo_like(side: int, seed: int = 0) -> Image.Image:
    """Smooth structure plus faint grain, like a picture rather than noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32)
    grain = rng.normal(0, 2, smooth.shape)
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def test_sharpness_is_measured_on_block_averages_from_1024_px():
    for side, factor in [(128, 1), (1023, 1), (1024, 2), (1536, 3)]:
        image = photo_like(side)
        grey = image.convert("L")
        expected = grey.reduce(factor) if factor > 1 else grey
        assert perceptual_metrics(image)["sharpness"] == pytest.approx(
            laplacian_variance(np.asarray(expected, dtype=np.float32))
        )
    # So a 2x upscale of a 512 px image measures exactly as the image itself.
    small = photo_like(512)
    upscaled = small.resize((1024, 1024), Image.Resampling.NEAREST)
    assert perceptual_metrics(upscaled)["sharpness"] == perceptual_metrics(small)["sharpness"]


def test_blank_detection_at_1024_px_is_unchanged_by_the_block_averages():
    big = 1024
    rng = np.random.default_rng(1)
    stars = np.zeros((big, big, 3), dtype=np.uint8)
    stars[rng.random((big, big)) < 0.01] = 255  # 1 % of the pixels, at random
    faint = np.clip(100 + rng.integers(-2, 3, (big, big, 3)), 0, 255).astype(np.uint8)
    for pixels in (stars, faint):
        metrics = perceptual_metrics(Image.fromarray(pixels))
        luminance = np.asarray(Image.fromarray(pixels).convert("L"), dtype=np.float64)
        assert metrics["contrast"] == pytest.approx(luminance.std() / 255)  # full resolution
        assert metrics["is_blank"] is True
    assert perceptual_metrics(photo_like(big))["is_blank"] is False


def test_a_new_metrics_version_invalidates_earlier_scores(monkeypatch):
    from imagegen_pipeline.scoring.perceptual import DEFAULT_BLANK_THRESHOLDS
    from imagegen_pipeline.steps import scores as scoring_step

    row = {"sha256": "abc", "original_prompt": "a cat", "prompt": "a cat, detailed"}
    now = scoring_step.score_key(row, "ViT-L-14/openai", DEFAULT_BLANK_THRESHOLDS)
    monkeypatch.setattr(scoring_step, "METRICS_VERSION", 1)
    before = scoring_step.score_key(row, "ViT-L-14/openai", DEFAULT_BLANK_THRESHOLDS)
    assert now != before
