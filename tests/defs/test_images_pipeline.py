"""The graph on tiny models with Dagster's test APIs: outputs, run metadata, resume, rejects."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import open_clip
import pandas as pd
import pytest
from diffusers import FluxPipeline, StableDiffusionXLPipeline, StableVideoDiffusionPipeline
from PIL import Image

from imagegen_pipeline.definitions import defs
from imagegen_pipeline.defs.resources import reconfigured
from imagegen_pipeline.local_runner import materialize_prompt_set
from imagegen_pipeline.run_metadata import load_run_metadata

LOCAL = ["flux_schnell", "sdxl_turbo"]
# example.csv in conftest: cat x2 (all backends), city x1 (all), owl x1 (flux only).
EXPECTED_IMAGES = {"flux_schnell": 4, "sdxl_turbo": 3}


def storage_base(resources: dict) -> Path:
    return Path(resources["storage"].base_dir)


def test_graph_makes_every_image_with_metadata(dagster_instance, make_resources):
    resources = make_resources()
    results = materialize_prompt_set(
        defs, "example", LOCAL, instance=dagster_instance, resources=resources
    )
    assert all(result.success for result in results)
    base = storage_base(resources)

    for backend, count in EXPECTED_IMAGES.items():
        pngs = sorted((base / "images" / "example" / backend).rglob("*.png"))
        assert len(pngs) == count
        with Image.open(pngs[0]) as image:
            assert image.size == (64, 64)
            parameters = json.loads(image.text["parameters"])
        assert parameters["backend"] == backend
        assert parameters["image_id"].startswith(pngs[0].stem.split("_")[1])

    images = load_run_metadata(base, "images")
    assert sorted(images.groupby("backend").size().items()) == sorted(EXPECTED_IMAGES.items())
    assert set(images["status"]) == {"ok"}
    cat = images[(images.prompt_id == "cat") & (images.backend == "flux_schnell")]
    assert sorted(cat["seed"]) == [11, 12]  # CSV seed 11, incremented for the second image
    assert images["sha256"].str.len().eq(64).all()
    assert (images["device"] == "cpu").all() and images["peak_gpu_memory_mb"].isna().all()

    steps = load_run_metadata(base, "steps")
    images_steps = steps[steps.asset == "images"]
    assert sorted(images_steps["generated"]) == [3, 4]
    assert (images_steps["model_loads"] == 1).all()

    materialization = dagster_instance.get_latest_materialization_event(
        dg.AssetKey("images")
    ).asset_materialization
    metadata = materialization.metadata
    assert metadata["rows"].value in EXPECTED_IMAGES.values()
    assert "data:image/jpeg;base64," in metadata["thumbnails"].value
    assert "| prompt_id" in metadata["preview"].value
    assert Path(metadata["run_metadata_images"].value).exists()


def test_second_materialization_generates_nothing_and_calls_no_pipeline(
    dagster_instance, make_resources, monkeypatch
):
    resources = make_resources()
    materialize_prompt_set(defs, "example", LOCAL, instance=dagster_instance, resources=resources)
    base = storage_base(resources)
    before = {p: p.stat().st_mtime_ns for p in (base / "images").rglob("*.png")}

    def no_model_work(*args, **kwargs):
        raise AssertionError("a re-run must not load or call a pipeline")

    for pipeline_class in (FluxPipeline, StableDiffusionXLPipeline, StableVideoDiffusionPipeline):
        monkeypatch.setattr(pipeline_class, "from_pretrained", no_model_work)
        monkeypatch.setattr(pipeline_class, "__call__", no_model_work)
    # Scores and clips are reused as well: CLIP is not even loaded.
    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_model_work)
    results = materialize_prompt_set(
        defs, "example", LOCAL, instance=dagster_instance, resources=resources
    )

    assert all(result.success for result in results)
    after = {p: p.stat().st_mtime_ns for p in (base / "images").rglob("*.png")}
    assert after == before
    images = load_run_metadata(base, "images")
    second_run = images[images.run_id.isin([r.run_id for r in results])]
    assert len(second_run) == sum(EXPECTED_IMAGES.values())
    assert set(second_run["status"]) == {"skipped_existing"}
    steps = load_run_metadata(base, "steps")
    assert (steps[steps.run_id.isin([r.run_id for r in results])]["model_loads"] == 0).all()
    quality = pd.read_parquet(base / "tables/quality/example/flux_schnell.parquet")
    assert quality["scored"].all() and not quality["newly_scored"].any()


def test_changed_prompt_generates_only_the_changed_images(
    dagster_instance, make_resources, prompts_dir
):
    resources = make_resources()
    materialize_prompt_set(
        defs, "example", ["sdxl_turbo"], instance=dagster_instance, resources=resources
    )
    csv = prompts_dir / "example.csv"
    csv.write_text(csv.read_text().replace("neon city street", "quiet city street"))
    results = materialize_prompt_set(
        defs, "example", ["sdxl_turbo"], instance=dagster_instance, resources=resources
    )
    images = load_run_metadata(storage_base(resources), "images")
    latest = images[images.run_id == results[1].run_id]
    assert dict(latest.groupby("status").size()) == {"ok": 1, "skipped_existing": 2}
    assert latest[latest.status == "ok"]["prompt_id"].tolist() == ["city"]


def test_rejected_rows_are_kept_counted_and_flagged(dagster_instance, make_resources, prompts_dir):
    (prompts_dir / "mixed.csv").write_text(
        "prompt_id,prompt,style,seed\n"
        "good,a lighthouse in a storm,cinematic,1\n"
        "bad-style,a cat,cubism,2\n"
        "bad-seed,a dog,none,many\n"
    )
    resources = make_resources()
    results = materialize_prompt_set(
        defs, "mixed", ["sdxl_turbo"], instance=dagster_instance, resources=resources
    )
    assert all(result.success for result in results)
    rejected = pd.read_parquet(storage_base(resources) / "tables/rejected_prompts/mixed.parquet")
    assert sorted(zip(rejected["line"], rejected["field"], strict=True)) == [
        (3, "style"),
        (4, "seed"),
    ]
    assert all(rejected["file"].str.endswith("mixed.csv"))

    prompts_event = dagster_instance.get_latest_materialization_event(dg.AssetKey("prompts"))
    assert prompts_event.asset_materialization.metadata["rejected_rows"].value == 2
    check = results[0].get_asset_check_evaluations()[0]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN


def test_a_file_without_valid_rows_fails_with_one_clear_message(
    dagster_instance, make_resources, prompts_dir
):
    (prompts_dir / "broken.csv").write_text("text\nhello\n")
    results = materialize_prompt_set(
        defs,
        "broken",
        ["sdxl_turbo"],
        instance=dagster_instance,
        resources=make_resources(),
        raise_on_error=False,
    )
    assert len(results) == 1 and not results[0].success
    failure = next(e for e in results[0].all_events if e.event_type_value == "STEP_FAILURE")
    assert "broken.csv: missing required column 'prompt'" in failure.step_failure_data.error.message


@pytest.mark.parametrize("backend", LOCAL)
def test_step_fails_only_when_nothing_succeeded(
    dagster_instance, make_resources, backend, tmp_path
):
    broken = reconfigured(make_resources()[backend], model=str(tmp_path / "missing-model"))
    results = materialize_prompt_set(
        defs,
        "example",
        [backend],
        instance=dagster_instance,
        resources=make_resources(**{backend: broken}),
        raise_on_error=False,
    )
    assert results[0].success and not results[1].success
    failure = next(e for e in results[1].all_events if e.event_type_value == "STEP_FAILURE")
    assert "missing-model" in failure.step_failure_data.error.message
