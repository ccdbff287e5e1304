"""Seeds and content addresses: stable, and sensitive to everything that changes pixels."""

import hashlib
from dataclasses import replace

import pytest

from imagegen_pipeline.backends.base import ImageRequest
from imagegen_pipeline.model_settings import GenerationSettings
from imagegen_pipeline.steps.images import SEED_MODULUS, content_address, derive_seed

SETTINGS = GenerationSettings("flux_schnell", "black-forest-labs/FLUX.1-schnell", "main", 4, 0.0)
REQUEST = ImageRequest("cat", 0, "a cat", "", 42, 1024, 1024)


def test_csv_seeds_are_used_as_given_then_incremented():
    assert [derive_seed("cat", i, 42) for i in range(3)] == [42, 43, 44]
    assert derive_seed("cat", 1, SEED_MODULUS - 1) == 0


def test_derived_seeds_are_stable_and_distinct():
    seeds = {derive_seed(prompt_id, index) for prompt_id in ("a", "b") for index in range(50)}
    assert len(seeds) == 100
    assert all(0 <= seed < SEED_MODULUS for seed in seeds)
    # sha256, not hash(): seeds must not change between Python processes or versions.
    expected = int.from_bytes(hashlib.sha256(b"cat:0").digest()[:8], "big") % 2**31
    assert SEED_MODULUS == 2**31  # one seed works for torch generators and Gemini's int32
    assert derive_seed("cat", 0) == expected


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a dog"},
        {"negative_prompt": "blurry"},
        {"seed": 43},
        {"width": 512},
        {"height": 512},
    ],
)
def test_address_changes_with_every_request_input(change):
    assert content_address(SETTINGS, replace(REQUEST, **change)) != content_address(
        SETTINGS, REQUEST
    )


@pytest.mark.parametrize(
    "change",
    [
        {"backend": "sdxl_turbo"},
        {"model_id": "other/model"},
        {"revision": "abc123"},
        {"steps": 8},
        {"guidance": 3.5},
    ],
)
def test_address_changes_with_every_model_setting(change):
    assert content_address(replace(SETTINGS, **change), REQUEST) != content_address(
        SETTINGS, REQUEST
    )


def test_address_ignores_what_does_not_change_pixels():
    # The prompt id and the image's position only name the file; the pixels are the same.
    moved = replace(REQUEST, prompt_id="renamed", image_index=3)
    assert content_address(SETTINGS, moved) == content_address(SETTINGS, REQUEST)


def test_a_steps_summary_adds_the_totals_of_its_calls_and_keeps_the_last_facts():
    from imagegen_pipeline.backends.base import RunSummary

    totals = frozenset({"loads", "seconds", "errors", "budget_reached"})
    first = RunSummary(
        {"loads": 1, "seconds": 0.5, "errors": {"429": 2}, "budget_reached": False, "batch": 8},
        ["slow"],
        totals,
    )
    later = RunSummary(
        {"loads": 2, "seconds": 0.25, "errors": {"429": 1, "503": 1}, "budget_reached": True,
         "batch": 4},
        ["slow", "budget"],
        totals,
    )  # fmt: skip
    step = RunSummary().followed_by(first).followed_by(later)
    assert step.metadata == {
        "loads": 3,
        "seconds": 0.75,
        "errors": {"429": 3, "503": 1},
        "budget_reached": True,
        "batch": 4,  # not a total: the later call's
    }
    assert step.warnings == ["slow", "budget"]
