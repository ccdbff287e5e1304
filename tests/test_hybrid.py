"""Hybrid overflow: routing rows with backends "any" between a local backend and Gemini."""

from __future__ import annotations

import pandas as pd
import pytest

from imagegen_pipeline.backends.gemini.settings import GeminiSettings
from imagegen_pipeline.records import StepRecord
from imagegen_pipeline.run_metadata import write_records
from imagegen_pipeline.steps.hybrid import (
    Routing,
    measured_seconds_per_image,
    route_rows,
    routed_prompts,
    with_hybrid_split,
)
from imagegen_pipeline.storage import Storage


def enhanced(*rows: tuple[str, int, list[str]]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"prompt_id": pid, "num_images": n, "backends": backends} for pid, n, backends in rows]
    )


ROWS = enhanced(
    ("fixed", 2, ["flux_schnell"]),
    ("a", 3, ["any"]),
    ("b", 3, ["any"]),
    ("c", 1, ["any"]),
    ("g", 1, ["gemini"]),
)


def route(previous=None, **limits):
    values = {
        "seconds_per_image": 10.0,
        "limit_seconds": 60.0,
        "image_usd": 0.02,
        "budget_usd": None,
    }
    return route_rows(ROWS, previous or Routing("flux_schnell", "gemini"), **{**values, **limits})


def test_rows_go_local_while_the_queue_is_under_the_limit_then_overflow():
    routing = route()  # 2 queued + 3 = 50 s fits 60 s; +3 = 80 s does not; +1 = 60 s fits
    assert routing.rows == {"a": "flux_schnell", "b": "gemini", "c": "flux_schnell"}
    assert routing.queue_seconds == 60.0 and routing.overflow_usd == pytest.approx(0.06)
    assert routing.images(ROWS, "gemini") == 3 and routing.images(ROWS, "flux_schnell") == 4


def test_the_budget_keeps_rows_local_and_nothing_is_dropped():
    routing = route(limit_seconds=0.0, budget_usd=0.07)  # room for 3 overflow images
    assert routing.rows == {"a": "gemini", "b": "flux_schnell", "c": "flux_schnell"}
    assert set(routing.rows) == {"a", "b", "c"}


def test_a_routed_row_never_moves():
    first = route(limit_seconds=0.0)
    assert set(first.rows.values()) == {"gemini"}
    again = route(previous=first, limit_seconds=1e9)  # a queue that now looks empty
    assert again.rows == first.rows


def test_the_measured_rate_comes_from_the_step_rows(tmp_path):
    storage = Storage(tmp_path)
    rows = [
        StepRecord(
            "r1", "images", "s", "flux_schnell", "m", None, "cpu", "w", generated=10, seconds=20.0
        ),
        StepRecord(
            "r2", "images", "s", "flux_schnell", "m", None, "cpu", "w", generated=4, seconds=16.0
        ),
        StepRecord(
            "r3", "images", "s", "flux_schnell", "m", None, "cpu", "w", generated=0, seconds=1.0
        ),  # made nothing: not a rate
        StepRecord(
            "r4", "quality", "s", "flux_schnell", "m", None, "cpu", "w", generated=9, seconds=1.0
        ),  # another asset
    ]
    for row in rows:
        write_records(
            storage, "steps", [row], run_id=row.run_id, prompt_set="s", backend="flux_schnell"
        )
    assert measured_seconds_per_image(storage, "flux_schnell") == pytest.approx(3.0)
    assert measured_seconds_per_image(storage, "sdxl_turbo") is None


def test_both_partitions_read_one_decision(tmp_path):
    storage = Storage(tmp_path)
    settings = GeminiSettings(overflow_queue_limit_seconds=50.0, overflow_seconds_per_image=10.0)
    common = {
        "local_backend": "flux_schnell",
        "overflow_backend": "gemini",
        "settings": settings,
        "log": lambda _: None,
    }

    first, routing = routed_prompts(storage, "s", ROWS, **common)
    # The second partition runs later with a very different limit: the decision stands.
    later = settings.model_copy(update={"overflow_queue_limit_seconds": 1e9})
    second, _ = routed_prompts(storage, "s", ROWS, **{**common, "settings": later})

    assert [list(b) for b in first["backends"]] == [list(b) for b in second["backends"]]
    assert routing.rows == {"a": "flux_schnell", "b": "gemini", "c": "gemini"}
    assert list(ROWS["backends"][1]) == ["any"]  # the input is not changed
    untouched, none = routed_prompts(storage, "t", ROWS.iloc[[0, 4]], **common)
    assert none is None and list(untouched["prompt_id"]) == ["fixed", "g"]


def test_the_comparison_shows_the_split_and_its_cost():
    summary = pd.DataFrame({"backend": ["flux_schnell", "gemini"], "images": [4, 3]})
    reports = {
        "flux_schnell": pd.DataFrame(
            {
                "prompt_id": ["a", "a", "fixed"],
                "status": ["ok", "ok", "ok"],
                "generation_cost_usd": [None, None, None],
            }
        ),
        "gemini": pd.DataFrame(
            {
                "prompt_id": ["b", "b", "b"],
                "status": ["ok", "ok", "failed"],
                "generation_cost_usd": [0.02, 0.02, None],
            }
        ),
    }
    split = with_hybrid_split(summary, reports, {"a": "flux_schnell", "b": "gemini"})
    assert list(split["any_rows_images"]) == [2, 2]
    assert list(split["any_rows_cost_usd"]) == pytest.approx([0.0, 0.04])
    assert with_hybrid_split(summary, reports, {}) is summary
