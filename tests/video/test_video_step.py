"""The video step: which images get a video clip, content addresses, re-runs that skip finished
video clips, and recovery from runs killed between writing files and flushing rows."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from upath import UPath

from imagegen_pipeline.run_metadata import load_run_metadata
from imagegen_pipeline.steps.clips import (
    VideoStepContext,
    plan_video_clips,
    run_video_step,
    select_sources,
)
from imagegen_pipeline.storage import Storage
from imagegen_pipeline.video.svd import SvdGenerator
from imagegen_pipeline.video.video_clip import video_clip_address, video_clip_seed
from imagegen_pipeline.video.video_files import read_mp4_frames, read_preview_facts
from tests.video.test_svd import SMALL, SVD_XT, SvdSpy, svd_settings


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
    base = SvdGenerator(svd_settings(SVD_XT)).settings
    address = video_clip_address(base, "image", 1)
    changed = [
        video_clip_address(dataclasses.replace(base, **{field.name: 99}), "image", 1)
        for field in dataclasses.fields(base)
    ]
    changed += [
        video_clip_address(base, "other-image", 1),
        video_clip_address(base, "image", 2),
    ]
    assert address not in changed and len(set(changed)) == len(changed)
    assert address == video_clip_address(base, "image", 1)


def test_the_address_follows_the_source_image_id_not_its_bytes(sources):
    """A PNG's bytes carry the run id and times of the run that wrote it: the same picture
    written again by another run must keep its clips."""
    settings = SvdGenerator(svd_settings(SVD_XT)).settings
    rewritten = sources.assign(sha256=["other", "bytes"])
    assert plan_video_clips(rewritten, settings) == plan_video_clips(sources, settings)


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
                "prompt_id": prompt_id,
                "image_index": 0,
                "image_id": f"id-{prompt_id}",
                "path": str(path),
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "status": "ok",
            }
        )
    return pd.DataFrame(rows)


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(tmp_path / "storage")


def small_generator(tiny_svd: Path, **settings) -> SvdGenerator:
    return SvdGenerator(svd_settings(tiny_svd, **{**SMALL, **settings}))


def run(generator: SvdGenerator, sources: pd.DataFrame, storage: Storage, run_id: str = "run-1"):
    planned = plan_video_clips(sources, generator.settings)
    step = VideoStepContext(storage, "set", "flux_schnell", run_id)
    return run_video_step(
        generator.settings, lambda: generator, planned, step, log=lambda message: None
    )


def clip_rows(storage: Storage, history: bool = False) -> pd.DataFrame:
    return load_run_metadata(
        storage, "clips", prompt_set="set", backend="flux_schnell", history=history
    )


def test_a_rerun_makes_no_clip_and_a_changed_setting_makes_new_ones(tiny_svd, sources, storage):
    generator = small_generator(tiny_svd)
    first = run(generator, sources, storage)
    assert first.counts == {"ok": 2}
    assert first.generated == 2 and generator.model_loads == 1 and first.load_seconds > 0
    record = first.records[0]
    assert Path(record.path).name.startswith("00_") and record.path.endswith(".mp4")
    assert Path(record.preview_path).is_file() and record.preview_path.endswith(".webp")
    mp4 = Path(record.path).read_bytes()
    assert len(read_mp4_frames(mp4)) == SMALL["num_frames"]
    assert record.sha256 == hashlib.sha256(mp4).hexdigest()
    assert record.seed == video_clip_seed("id-a") and record.source_image_id == "id-a"

    again = small_generator(tiny_svd)
    again.load()
    spy = again.pipeline = SvdSpy(again.pipeline)
    second = run(again, sources, storage, "run-2")
    assert spy.calls == []
    assert second.counts == {"skipped_existing": 2} and second.generated == 0
    assert [r.clip_id for r in second.records] == [r.clip_id for r in first.records]
    assert [r.sha256 for r in second.records] == [r.sha256 for r in first.records]
    # With nothing to make, a cold model is never loaded.
    cold = small_generator(tiny_svd)
    assert run(cold, sources, storage, "run-3").load_seconds == 0.0
    assert cold.model_loads == 0 and cold.pipeline is None

    more_motion = small_generator(tiny_svd, motion_bucket_id=200)
    third = run(more_motion, sources, storage, "run-4")
    assert third.counts == {"ok": 2}
    assert len(list(Path(storage.base.path).rglob("*.mp4"))) == 4


def test_a_failing_clip_fails_alone(tiny_svd, sources, storage):
    generator = small_generator(tiny_svd)
    generator.load()

    def reject_second(kwargs: dict) -> None:
        if len(spy.calls) == 2:
            raise RuntimeError("decoder exploded")

    spy = generator.pipeline = SvdSpy(generator.pipeline, reject_second)
    outcome = run(generator, sources, storage)
    assert [r.status for r in outcome.records] == ["ok", "failed"]
    assert outcome.records[1].error == "RuntimeError: decoder exploded"
    assert outcome.records[1].path is None and outcome.records[1].preview_path is None
    assert len(list(Path(storage.base.path).rglob("*.mp4"))) == 1
    assert list(clip_rows(storage)["status"]) == ["ok", "failed"]


def test_a_partition_without_images_plans_no_clip(storage):
    empty = pd.DataFrame()
    assert select_sources(empty, "top_n", 1).empty
    assert plan_video_clips(empty, SvdGenerator(svd_settings(SVD_XT)).settings) == []


class Killed(BaseException):
    """The process dying mid-write: nothing after it runs, nothing catches it."""


class KilledBeforePreview(Storage):
    """Storage whose process dies right before writing the preview of prompt ``b``'s clip."""

    def write_bytes(self, path: UPath, data: bytes) -> None:
        if path.suffix == ".webp" and path.parent.name == "b":
            raise Killed
        super().write_bytes(path, data)


def ok_rows_per_clip(storage: Storage) -> dict[str, int]:
    rows = clip_rows(storage)
    return rows[rows["status"] == "ok"]["clip_id"].value_counts().to_dict()


def test_a_clip_killed_between_its_mp4_and_its_preview_is_made_again(tiny_svd, sources, storage):
    with pytest.raises(Killed):
        run(small_generator(tiny_svd), sources, KilledBeforePreview(storage.base))
    clips = Path(storage.base.path) / "clips" / "set" / "flux_schnell"
    assert len(list((clips / "a").glob("*.mp4"))) == len(list((clips / "a").glob("*.webp"))) == 1
    assert len(list((clips / "b").glob("*.mp4"))) == 1  # the MP4 alone is not a done clip
    assert list((clips / "b").glob("*.webp")) == []

    generator = small_generator(tiny_svd)
    generator.load()
    spy = generator.pipeline = SvdSpy(generator.pipeline)
    outcome = run(generator, sources, storage, "run-2")
    assert [r.status for r in outcome.records] == ["skipped_existing", "ok"]
    assert len(spy.calls) == 1  # only b's clip is made again
    assert spy.calls[0]["generator"].initial_seed() == video_clip_seed("id-b")
    redone = outcome.records[1]
    assert redone.run_id == "run-2" and not redone.recovered
    assert redone.sha256 == hashlib.sha256(Path(redone.path).read_bytes()).hexdigest()
    assert read_preview_facts(Path(redone.preview_path).read_bytes())["run_id"] == "run-2"
    # One generation row per clip however the first run died (a's row may have been lost
    # with it, and is then recovered from a's preview).
    assert ok_rows_per_clip(storage) == {r.clip_id: 1 for r in outcome.records}


def test_a_lost_metadata_row_is_recovered_from_the_preview(tiny_svd, sources, storage):
    first = run(small_generator(tiny_svd), sources, storage)
    assert first.counts == {"ok": 2}
    shutil.rmtree(Path(storage.base.path) / "run_metadata" / "clips")
    assert clip_rows(storage).empty

    cold = small_generator(tiny_svd)
    second = run(cold, sources, storage, "run-2")
    assert second.counts == {"skipped_existing": 2} and cold.model_loads == 0
    rows = clip_rows(storage, history=True)
    recovered = rows[rows["status"] == "ok"].set_index("clip_id")
    assert len(recovered) == 2 and recovered["recovered"].all()
    for made in first.records:
        row = recovered.loc[made.clip_id]
        facts = read_preview_facts(Path(made.preview_path).read_bytes())
        # The facts of the run that made the clip, not of the run that found it.
        assert row["run_id"] == facts["run_id"] == "run-1"
        assert row["seconds"] == facts["seconds"] == made.seconds > 0
        assert row["seed"] == made.seed == video_clip_seed(made.source_image_id)
        assert row["started_at"] == pd.Timestamp(made.started_at)
        assert row["finished_at"] == pd.Timestamp(made.finished_at)
        assert (row["sha256"], row["path"]) == (made.sha256, made.path)
        assert row["device"] == made.device == "cpu"
    # A run that finds outputs writes no row for them (its step row counts them).
    assert "skipped_existing" not in set(rows["status"])

    # Recovered once: a later run finds the row and adds no second generation row.
    run(small_generator(tiny_svd), sources, storage, "run-3")
    assert ok_rows_per_clip(storage) == {made.clip_id: 1 for made in first.records}


def test_a_truncated_clip_is_moved_aside_and_made_again(tiny_svd, sources, storage):
    first = run(small_generator(tiny_svd), sources, storage)
    damaged = Path(first.records[0].path)
    damaged.write_bytes(damaged.read_bytes()[:300])

    second = run(small_generator(tiny_svd), sources, storage, "run-2")
    assert [r.status for r in second.records] == ["ok", "skipped_existing"]
    assert "size" in second.records[0].damage
    assert len(read_mp4_frames(damaged.read_bytes())) == SMALL["num_frames"]
    quarantine = Path(storage.base.path) / "quarantine" / "clips" / "set" / "flux_schnell" / "a"
    assert sorted(p.suffix for p in quarantine.iterdir()) == [".mp4", ".webp"]
    rows = clip_rows(storage, history=True)  # the damaged row is superseded by the new clip's
    assert rows[rows["status"] == "damaged"]["clip_id"].tolist() == [first.records[0].clip_id]


def test_an_unreadable_source_image_fails_its_clip_alone(tiny_svd, sources, storage):
    Path(sources.loc[0, "path"]).write_bytes(b"not a png any more")
    outcome = run(small_generator(tiny_svd), sources, storage)
    assert [r.status for r in outcome.records] == ["failed", "ok"]
    assert "UnidentifiedImageError" in outcome.records[0].error
