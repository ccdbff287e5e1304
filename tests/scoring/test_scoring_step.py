"""The scoring step's code path: every image row scored once, missing files failing alone,
video clips scored from their decoded frames, earlier scores reused."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imagegen_pipeline.scoring.clip_model import ClipModel, ClipModelSettings
from imagegen_pipeline.steps.scores import (
    Scorer,
    prefetched,
    score_image_table,
    score_video_clip_table,
    with_generation_facts,
)
from imagegen_pipeline.storage import Storage
from imagegen_pipeline.video.video_files import mp4_bytes, webp_preview_bytes

QUIET = {"log": lambda message: None}


@pytest.fixture
def clip_model(tiny_open_clip: Path) -> ClipModel:
    settings = ClipModelSettings(model=f"local-dir:{tiny_open_clip}", device="cpu", batch_size=2)
    return ClipModel(settings)


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(tmp_path)


def image_table(folder: Path, count: int) -> pd.DataFrame:
    rows = []
    rng = np.random.default_rng(0)
    for index in range(count):
        path = folder / f"{index}.png"
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
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
    return pd.DataFrame(rows)


ORIGINALS = {"p0": "first prompt", "p1": "second prompt"}


def test_every_existing_image_is_scored_in_order(clip_model, storage, tmp_path):
    table = image_table(tmp_path, 5)
    table.loc[3, ["status", "path"]] = ["failed", None]
    Path(table.loc[4, "path"]).unlink()  # listed as ok, but gone from disk
    Image.new("RGB", (48, 48), "black").save(table.loc[1, "path"])

    report = score_image_table(
        Scorer.of(clip_model), table, ORIGINALS, storage=storage, workers=3, **QUIET
    )
    assert list(report["image_id"]) == list(table["image_id"])
    assert list(report["scored"]) == [True, True, True, False, False]
    assert report.loc[4, "score_error"].startswith("FileNotFoundError")
    assert pd.isna(report.loc[3, "score_error"]) and pd.isna(report.loc[3, "clip_score"])
    assert list(report["is_blank"].iloc[:3]) == [False, True, False]
    assert list(report["original_prompt"]) == ["first prompt", "second prompt"] * 2 + [
        "first prompt"
    ]
    assert (report["scorer_model"] == clip_model.model_label).all()
    # The same scores as the model's own batched path.
    with Image.open(table.loc[2, "path"]) as image:
        (direct,) = clip_model.score_images(
            [image.convert("RGB")], ["first prompt"], ["enhanced prompt 2"]
        )
    assert report.loc[2, "clip_score"] == pytest.approx(direct["clip_score"], abs=1e-4)
    assert report.loc[2, "aesthetic"] == pytest.approx(direct["aesthetic"], abs=1e-4)


def test_unchanged_images_reuse_their_scores_and_load_nothing(tiny_open_clip, storage, tmp_path):
    def fresh_model() -> ClipModel:
        return ClipModel(ClipModelSettings(model=f"local-dir:{tiny_open_clip}", device="cpu"))

    table = image_table(tmp_path, 3)
    first = score_image_table(Scorer.of(fresh_model()), table, ORIGINALS, storage=storage, **QUIET)
    assert first["newly_scored"].all()

    cold = fresh_model()
    again = score_image_table(
        Scorer.of(cold), table, ORIGINALS, storage=storage, previous=first, **QUIET
    )
    assert cold.model_loads == 0  # nothing left to score: the model is never loaded
    assert again["scored"].all() and not again["newly_scored"].any()
    assert list(again["clip_score"]) == list(first["clip_score"])

    # New bytes or a new original prompt invalidate exactly that image's scores.
    changed = table.assign(sha256=["sha0", "new-bytes", "sha2"])
    model = fresh_model()
    prompts = {**ORIGINALS, "p0": "another prompt"}
    third = score_image_table(
        Scorer.of(model), changed, prompts, storage=storage, previous=first, **QUIET
    )
    assert list(third["newly_scored"]) == [True, True, True]  # p0 rows 0 and 2, row 1's bytes
    fourth = score_image_table(
        Scorer.of(model), changed, ORIGINALS, storage=storage, previous=first, **QUIET
    )
    assert list(fourth["newly_scored"]) == [False, True, False]
    assert model.model_loads == 1


def test_prefetching_keeps_order_and_a_bounded_window():
    running, peak = 0, 0
    lock = threading.Lock()

    def slow_square(value: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.01 * (value % 3))
        with lock:
            running -= 1
        return value * value

    started = []

    def items():
        for value in range(20):
            started.append(value)
            yield value

    results = []
    for result in prefetched(slow_square, items(), workers=4, window=5):
        results.append(result)
        assert len(started) <= len(results) + 5  # never more than the window ahead
    assert results == [v * v for v in range(20)] and peak <= 4
    assert list(prefetched(slow_square, range(3), workers=0, window=1)) == [0, 1, 4]


def test_generation_facts_come_from_the_run_that_made_the_image():
    table = pd.DataFrame({"image_id": ["a", "b"], "status": ["skipped_existing", "ok"]})
    at = [datetime(2026, 1, day, tzinfo=UTC) for day in (1, 2, 3, 4)]
    runs = pd.DataFrame(
        {
            "image_id": ["a", "a", "a", "b"],
            "status": ["ok", "ok", "skipped_existing", "ok"],
            "seconds": [1.0, 2.0, 0.0, 3.0],
            "cost_usd": [0.01, 0.02, None, None],
            "finished_at": at,
        }
    )
    facts = with_generation_facts(table, runs)
    assert list(facts["generation_seconds"]) == [2.0, 3.0]  # the latest generating run
    assert facts.loc[0, "generation_cost_usd"] == 0.02 and pd.isna(
        facts.loc[1, "generation_cost_usd"]
    )
    assert list(facts["generated_at"]) == [at[1], at[3]]


def test_video_clips_are_scored_from_their_decoded_frames(clip_model, storage, tmp_path):
    source = tmp_path / "source.png"
    still = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    still.save(source)
    storage.write_bytes(storage.path("still.mp4"), mp4_bytes([still] * 4, fps=7))
    storage.write_bytes(storage.path("still.webp"), webp_preview_bytes([still] * 4, fps=7))
    clips = pd.DataFrame(
        [
            {
                "clip_id": "c1",
                "status": "ok",
                "path": str(tmp_path / "still.mp4"),
                "source_path": str(source),
                "sha256": "mp4-sha",
            },
            {"clip_id": "c2", "status": "failed", "path": None, "source_path": str(source)},
            {
                "clip_id": "c3",
                "status": "ok",
                "path": str(tmp_path / "gone.mp4"),
                "source_path": str(source),
                "sha256": "gone-sha",
            },
        ]
    )
    report = score_video_clip_table(Scorer.of(clip_model), clips, storage=storage, **QUIET)
    assert list(report["scored"]) == [True, False, False]
    assert report.loc[0, "scored_frames"] == 4
    # A still video clip stays close to its (lossily encoded) source and to itself.
    assert report.loc[0, "temporal_consistency_min"] > 0.99
    assert report.loc[0, "source_similarity"] > 0.95
    assert report.loc[2, "score_error"].startswith("FileNotFoundError")  # fails alone
    assert (report["scorer_model"] == clip_model.model_label).all()

    # Scores of an unchanged video clip are reused without loading a model; a video clip that
    # could not be scored is tried again.
    cold = ClipModel(clip_model.config)
    again = score_video_clip_table(
        Scorer.of(cold), clips[:2], storage=storage, previous=report, **QUIET
    )
    assert cold.model_loads == 0
    assert again.loc[0, "source_similarity"] == report.loc[0, "source_similarity"]
    assert list(again["newly_scored"]) == [False, False]
    retried = score_video_clip_table(
        Scorer.of(cold), clips, storage=storage, previous=report, **QUIET
    )
    assert list(retried["newly_scored"]) == [False, False, True] and cold.model_loads == 1


def test_a_partition_without_images_gives_an_empty_report(clip_model, storage):
    report = score_image_table(Scorer.of(clip_model), pd.DataFrame(), {}, storage=storage, **QUIET)
    assert report.empty
    assert with_generation_facts(report, pd.DataFrame()).empty
    assert clip_model.model_loads == 0
