"""The clips step: which images get a clip, content addresses, re-runs that skip finished clips."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imagegen_pipeline.image_generation import sha256_file
from imagegen_pipeline.video.clip_generation import plan_clips, run_clips_step, select_sources
from imagegen_pipeline.video.svd import SvdConfig, SvdGenerator, clip_address
from imagegen_pipeline.video.writers import read_mp4_frames
from tests.video.test_svd import SMALL, SvdSpy


def quality_rows(**overrides) -> pd.DataFrame:
    """A quality table: prompt a has images 0-2, prompt b has image 0."""
    rows = [
        {"prompt_id": "a", "image_index": 0, "clip_score": 20.0},
        {"prompt_id": "a", "image_index": 1, "clip_score": 31.0},
        {"prompt_id": "a", "image_index": 2, "clip_score": 25.0},
        {"prompt_id": "b", "image_index": 0, "clip_score": 10.0},
    ]
    table = pd.DataFrame(rows).assign(status="ok", scored=True, is_blank=False)
    for column, values in overrides.items():
        table[column] = values
    return table


def picked(table: pd.DataFrame) -> list[tuple[str, int]]:
    return list(zip(table["prompt_id"], table["image_index"], strict=True))


def test_first_n_top_n_and_all():
    table = quality_rows()
    assert picked(select_sources(table, "first_n", 1)) == [("a", 0), ("b", 0)]
    assert picked(select_sources(table, "first_n", 2)) == [("a", 0), ("a", 1), ("b", 0)]
    assert picked(select_sources(table, "top_n", 1)) == [("a", 1), ("b", 0)]
    assert picked(select_sources(table, "top_n", 2)) == [("a", 1), ("a", 2), ("b", 0)]
    assert len(select_sources(table, "all", 1)) == 4


def test_missing_unscored_and_blank_images_are_never_animated():
    table = quality_rows(
        status=["failed", "ok", "skipped_existing", "ok"],
        is_blank=[False, True, False, False],
        scored=[False, True, True, True],
    )
    assert picked(select_sources(table, "first_n", 1)) == [("a", 2), ("b", 0)]
    with pytest.raises(ValueError, match="unknown selection"):
        select_sources(table, "best", 1)  # type: ignore[arg-type]


def test_every_setting_and_the_source_change_the_address():
    generator = SvdGenerator(SvdConfig(device="cpu"))
    base = generator.settings
    address = clip_address(base, "sha", "image", 1)
    changed = [
        clip_address(dataclasses.replace(base, **{field.name: 99}), "sha", "image", 1)
        for field in dataclasses.fields(base)
    ]
    changed += [
        clip_address(base, "other-sha", "image", 1),
        clip_address(base, "sha", "other-image", 1),
        clip_address(base, "sha", "image", 2),
    ]
    assert address not in changed and len(set(changed)) == len(changed)
    assert address == clip_address(base, "sha", "image", 1)


@pytest.fixture
def sources(tmp_path: Path) -> pd.DataFrame:
    """Two source PNGs and their quality rows."""
    rows = []
    for index, prompt_id in enumerate(["a", "b"]):
        path = tmp_path / "images" / prompt_id / f"00_{index}.png"
        path.parent.mkdir(parents=True)
        pixels = np.random.default_rng(index).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        rows.append(
            {
                "prompt_id": prompt_id, "image_index": 0, "image_id": f"id-{prompt_id}",
                "path": str(path), "sha256": sha256_file(path), "status": "ok",
            }
        )  # fmt: skip
    return pd.DataFrame(rows)


def run(generator: SvdGenerator, sources: pd.DataFrame, clips_dir: Path):
    planned = plan_clips(sources, generator, clips_dir)
    return run_clips_step(
        generator, planned, clips_dir=clips_dir, prompt_set="set", backend="flux_schnell",
        run_id="run-1", log=lambda message: None,
    )  # fmt: skip


def test_a_rerun_makes_no_clip_and_a_changed_setting_makes_new_ones(tiny_svd, sources, tmp_path):
    clips_dir = tmp_path / "clips"
    generator = SvdGenerator(SvdConfig(model=str(tiny_svd), **SMALL))
    first = run(generator, sources, clips_dir)
    assert first.counts == {"ok": 2, "skipped_existing": 0, "failed": 0}
    row = first.clip_rows[0]
    assert Path(row["path"]).name.startswith("00_") and row["path"].endswith(".mp4")
    assert len(read_mp4_frames(Path(row["path"]))) == SMALL["num_frames"]
    assert row["sha256"] == sha256_file(Path(row["path"]))
    assert first.step_row["generated"] == 2 and first.step_row["model_loads"] == 1

    again = SvdGenerator(SvdConfig(model=str(tiny_svd), **SMALL))
    again.load()
    spy = again.pipeline = SvdSpy(again.pipeline)
    second = run(again, sources, clips_dir)
    assert spy.calls == []
    assert second.counts == {"ok": 0, "skipped_existing": 2, "failed": 0}
    assert [r["clip_id"] for r in second.clip_rows] == [r["clip_id"] for r in first.clip_rows]
    assert [r["sha256"] for r in second.clip_rows] == [r["sha256"] for r in first.clip_rows]

    more_motion = SvdGenerator(SvdConfig(model=str(tiny_svd), **SMALL, motion_bucket_id=200))
    third = run(more_motion, sources, clips_dir)
    assert third.counts["ok"] == 2
    assert len(list(clips_dir.rglob("*.mp4"))) == 4


def test_a_failing_clip_fails_alone(tiny_svd, sources, tmp_path):
    generator = SvdGenerator(SvdConfig(model=str(tiny_svd), **SMALL))
    generator.load()

    def reject_second(kwargs: dict) -> None:
        if len(spy.calls) == 2:
            raise RuntimeError("decoder exploded")

    spy = generator.pipeline = SvdSpy(generator.pipeline, reject_second)
    outcome = run(generator, sources, tmp_path / "clips")
    assert [r["status"] for r in outcome.clip_rows] == ["ok", "failed"]
    assert outcome.clip_rows[1]["error"] == "RuntimeError: decoder exploded"
    assert outcome.clip_rows[1]["path"] is None
    assert len(list((tmp_path / "clips").rglob("*.mp4"))) == 1


def test_a_partition_without_images_plans_no_clip():
    empty = pd.DataFrame()
    assert select_sources(empty, "top_n", 1).empty
    assert plan_clips(empty, SvdGenerator(SvdConfig(device="cpu")), Path("unused")) == []
