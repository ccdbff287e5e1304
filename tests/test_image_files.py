"""PNG files that carry their parameters and generation facts."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

import numpy as np
import pytest
from PIL import Image

from imagegen_pipeline.image_files import (
    DEFAULT_PNG_COMPRESS_LEVEL,
    GENERATION_CHUNK,
    PARAMETERS_CHUNK,
    encode_png,
    read_png_record,
)

PARAMETERS = {
    "model_id": "black-forest-labs/FLUX.1-schnell",
    "prompt": "a café at night, 🌙",
    "seed": 1234,
    "width": 128,
    "height": 96,
    "steps": 4,
    "guidance": 0.0,
}
GENERATION = {
    "run_id": "run-1",
    "seconds": 1.25,
    "device": "cpu",
    "batch_size": 2,
    "started_at": datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
}


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    """Gradients with a little noise: compresses, but not to nothing."""
    y, x = np.mgrid[0:96, 0:128]
    noise = np.random.default_rng(0).integers(0, 8, (96, 128, 3))
    pixels = (np.stack([x * 2, y * 2, x + y], axis=-1) % 256 + noise).astype(np.uint8)
    return Image.fromarray(pixels)


def decoded(data: bytes) -> tuple[np.ndarray, dict[str, str]]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB")), dict(image.text)


def test_round_trip(picture: Image.Image) -> None:
    data = encode_png(picture, PARAMETERS, GENERATION)
    parameters, generation = read_png_record(data)
    assert parameters == PARAMETERS
    assert generation == {**GENERATION, "started_at": "2025-01-02 03:04:05+00:00"}
    pixels, _ = decoded(data)
    assert np.array_equal(pixels, np.asarray(picture))


def test_without_generation_facts(picture: Image.Image) -> None:
    data = encode_png(picture, {"seed": 1})
    assert read_png_record(data) == ({"seed": 1}, {})
    _, text = decoded(data)
    assert GENERATION_CHUNK not in text


def test_a_png_from_elsewhere_reads_as_empty() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    assert read_png_record(buffer.getvalue()) == ({}, {})


def test_viewer_chunks(picture: Image.Image) -> None:
    _, text = decoded(encode_png(picture, PARAMETERS, GENERATION))
    assert text["prompt"] == "a café at night, 🌙"
    assert text["seed"] == "1234"
    assert text["Software"] == "imagegen-pipeline"
    assert json.loads(text[PARAMETERS_CHUNK])["steps"] == 4
    assert json.loads(text[GENERATION_CHUNK])["run_id"] == "run-1"


def test_viewer_chunks_only_when_present(picture: Image.Image) -> None:
    _, text = decoded(encode_png(picture, {"width": 8}))
    assert "prompt" not in text
    assert "seed" not in text


def test_compress_level_changes_size_not_pixels(picture: Image.Image) -> None:
    sizes = {}
    for level in (0, 1, 9):
        data = encode_png(picture, PARAMETERS, compress_level=level)
        pixels, _ = decoded(data)
        assert np.array_equal(pixels, np.asarray(picture))
        assert read_png_record(data)[0] == PARAMETERS
        sizes[level] = len(data)
    assert sizes[0] > sizes[1] > sizes[9]
    default = encode_png(picture, PARAMETERS)
    assert len(default) == len(encode_png(picture, PARAMETERS, compress_level=1))
    assert DEFAULT_PNG_COMPRESS_LEVEL == 1


def test_same_inputs_same_bytes(picture: Image.Image) -> None:
    # Content hashes of files are recorded; encoding must not add anything that varies.
    shuffled = dict(reversed(list(PARAMETERS.items())))
    assert encode_png(picture, PARAMETERS, GENERATION) == encode_png(picture, shuffled, GENERATION)
