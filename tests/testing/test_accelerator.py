"""The accelerator stand-ins: photographic, correctly sized, distinct images; device time slept
as configured; the real images step and scoring step running around them unchanged."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imagegen_pipeline.backends.base import ImageRequest
from imagegen_pipeline.registry import IMAGE_BACKENDS
from imagegen_pipeline.run_metadata import load_run_metadata
from imagegen_pipeline.scoring.clip_model import ClipModel, ClipModelSettings
from imagegen_pipeline.steps.images import ImagesStepContext, plan_images, run_images_step
from imagegen_pipeline.steps.scores import Scorer, score_image_table
from imagegen_pipeline.storage import Storage
from tests.support.accelerator import (
    AcceleratorStandIn,
    PhotoSource,
    ScorerStandIn,
    enhanced_prompts,
)

QUIET = {"log": lambda message: None}


def requests(count: int, width: int = 96, height: int = 64) -> list[ImageRequest]:
    return [
        ImageRequest(f"p{i}", i % 2, f"prompt {i}", "", 1000 + i, width, height)
        for i in range(count)
    ]


def neighbour_correlation(pixels: np.ndarray) -> float:
    """Correlation of each pixel's luminance with its right-hand neighbour's."""
    luma = pixels.astype(np.float64) @ [0.299, 0.587, 0.114]
    return float(np.corrcoef(luma[:, :-1].ravel(), luma[:, 1:].ravel())[0, 1])


@pytest.mark.parametrize("size", [(512, 512), (160, 96)])
def test_photos_are_photographic_at_the_requested_size(size):
    photos = PhotoSource(pool_size=3)
    for index in range(3):
        image = photos.photo(*size, key=f"request {index}")
        assert image.size == size and image.mode == "RGB"
        pixels = np.asarray(image)
        colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
        assert colours > 0.2 * size[0] * size[1]  # many colours: not flat, not posterised
        assert pixels.std() > 30  # structure, not a flat fill
        assert neighbour_correlation(pixels) > 0.8  # smooth like a photo; noise is near 0
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert abs(neighbour_correlation(noise)) < 0.1


def test_every_request_gets_distinct_pixels_and_the_same_request_the_same():
    photos = PhotoSource(pool_size=2)
    images = [np.asarray(photos.photo(64, 48, key=f"r{i}")) for i in range(20)]
    assert len({image.tobytes() for image in images}) == 20  # more requests than photos
    assert np.array_equal(images[3], np.asarray(photos.photo(64, 48, key="r3")))
    first, second = (np.asarray(image, dtype=np.int16) for image in photos.pool(64, 48))
    assert np.abs(first - second).mean() > 10  # the photos of a pool differ visibly
    # A request's own mark changes at most the lowest bit of a few red values.
    for image in images:
        pooled = [np.asarray(p, dtype=np.int16) for p in photos.pool(64, 48)]
        assert min(np.abs(image - p).max() for p in pooled) <= 1


def test_the_stand_in_sleeps_its_device_time_per_batch_and_yields_every_request():
    backend = AcceleratorStandIn("flux_schnell", batch_size=4, seconds_per_image=0.05, side=96)
    backend.load()
    batch = requests(8, 96, 96)
    started = time.perf_counter()
    results = list(backend.generate(batch))
    elapsed = time.perf_counter() - started
    assert 0.4 <= elapsed < 1.4  # two batches of 4 x 50 ms
    assert backend.device_seconds == pytest.approx(0.4) and backend.batches == 2
    assert sorted(r.request.prompt_id for r in results) == sorted(r.prompt_id for r in batch)
    assert all(r.status == "ok" and r.image.size == (96, 96) for r in results)
    assert {r.details["batch_size"] for r in results} == {4}
    assert all(0.05 <= r.seconds < 0.3 for r in results)  # its share of the batch
    # Device time scales with pixels: twice the side, four times the time.
    assert backend.device_time(192, 192) == pytest.approx(4 * backend.device_time(96, 96))


def test_the_stand_in_takes_the_real_model_names_but_can_never_be_selected():
    turbo = AcceleratorStandIn("sdxl_turbo")
    assert turbo.name == "sdxl_turbo" and turbo.default_size == (512, 512)
    assert turbo.settings.steps == 1 and turbo.images_per_second == pytest.approx(1 / 0.028)
    flux = AcceleratorStandIn("flux_schnell")
    assert flux.default_size == (1024, 1024) and flux.settings.steps == 4
    assert "stand-in" in flux.settings.model_id  # no address can match a real image's
    assert not any("testing" in spec.implementation for spec in IMAGE_BACKENDS)
    with pytest.raises(KeyError):
        AcceleratorStandIn("gemini")


@pytest.mark.parametrize("stands_in_for", ["sdxl_turbo", "flux_schnell"])
def test_the_images_step_writes_every_image_alike_with_or_without_writer_threads(
    tmp_path, stands_in_for
):
    enhanced = enhanced_prompts(5, [stands_in_for], images_each=2, width=96, height=64)
    outcomes = {}
    for threads in (0, 2):
        backend = AcceleratorStandIn(stands_in_for, batch_size=3, seconds_per_image=0.001)
        storage = Storage(tmp_path / f"threads{threads}")
        planned = plan_images(enhanced, backend.target)
        step = ImagesStepContext(storage, "bench", f"run{threads}", writer_threads=threads)
        outcome = run_images_step(backend.target, lambda b=backend: b, planned, step, **QUIET)
        assert outcome.counts == {"ok": 10} and backend.model_loads == 1
        rows = load_run_metadata(storage, "images", prompt_set="bench", backend=stands_in_for)
        assert sorted(rows["image_id"]) == sorted(item.image_id for item in planned)
        for record in outcome.records:
            with Image.open(record.path) as image:
                assert image.size == (96, 64)
        outcomes[threads] = outcome
    inline, overlapped = (
        [(r.prompt_id, r.image_index, r.image_id, Path(r.path).name) for r in outcomes[t].records]
        for t in (0, 2)
    )
    assert inline == overlapped


def test_the_scorer_stand_in_has_the_real_preprocessing_and_columns(tiny_open_clip, tmp_path):
    photos = PhotoSource(pool_size=2)
    rows = []
    for index in range(5):
        path = tmp_path / f"{index}.png"
        photos.photo(320, 240, key=str(index)).save(path)
        rows.append(
            {
                "image_id": f"id{index}",
                "prompt_id": f"p{index % 2}",
                "image_index": index,
                "prompt": f"enhanced prompt {index}",
                "status": "ok",
                "path": str(path),
                "sha256": f"sha{index}",
            }
        )
    table = pd.DataFrame(rows)
    originals = {"p0": "first prompt", "p1": "second prompt"}
    storage = Storage(tmp_path)

    stand_in = ScorerStandIn(images_per_second=100.0, batch_size=2)
    started = time.perf_counter()
    report = score_image_table(
        Scorer.of(stand_in), table, originals, storage=storage, workers=2, **QUIET
    )
    assert time.perf_counter() - started >= 0.05  # 5 images at 100 images/s
    assert stand_in.device_seconds == pytest.approx(0.05) and stand_in.model_loads == 1
    assert report["scored"].all() and report["clip_score"].between(0, 100).all()

    real = ClipModel(ClipModelSettings(model=f"local-dir:{tiny_open_clip}", device="cpu"))
    expected = score_image_table(
        Scorer.of(real), table, originals, storage=storage, workers=2, **QUIET
    )
    assert list(report.columns) == list(expected.columns)
    assert report.dtypes.equals(expected.dtypes)
    # The tiny model is configured like ViT-L-14/openai: the same tensors come out.
    with Image.open(table.loc[0, "path"]) as image:
        assert stand_in.preprocess(image).equal(real.preprocess(image))
        assert tuple(stand_in.preprocess(image).shape) == (3, 224, 224)
