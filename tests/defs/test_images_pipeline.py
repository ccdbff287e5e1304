"""The graph on tiny models with Dagster's test APIs: outputs, run metadata, resume, rejects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import open_clip
import pandas as pd
import pytest
from diffusers import FluxPipeline, StableDiffusionXLPipeline, StableVideoDiffusionPipeline
from PIL import Image

from imagegen_pipeline import cli
from imagegen_pipeline.definitions import defs
from imagegen_pipeline.local_runner import materialize_prompt_sets, range_tags
from imagegen_pipeline.run_metadata import load_run_metadata
from tests.conftest import SECOND_CSV

LOCAL = ["flux_schnell", "sdxl_turbo"]
# example.csv in conftest: cat x2 (all backends), city x1 (all), owl x1 (flux only).
EXPECTED_IMAGES = {"flux_schnell": 4, "sdxl_turbo": 3}


def storage_base(resources: dict) -> Path:
    return Path(resources["storage"].base)


def run(prompt_sets, backends, instance, resources, **kwargs):
    return materialize_prompt_sets(
        defs, prompt_sets, backends, instance=instance, resources=resources, **kwargs
    )


def test_graph_makes_every_image_with_metadata(dagster_instance, make_resources):
    resources = make_resources()
    results = run(["example"], LOCAL, dagster_instance, resources)
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
    # The CLIP model of quality stays warm for video_quality, and across the backends' runs.
    scoring = steps[steps.asset.isin(["quality", "video_quality"])]
    assert scoring["model_loads"].sum() == 1 and scoring["model_cache_hits"].sum() == 3

    materialization = dagster_instance.get_latest_materialization_event(
        dg.AssetKey("images")
    ).asset_materialization
    metadata = materialization.metadata
    assert metadata["rows"].value in EXPECTED_IMAGES.values()
    assert "data:image/jpeg;base64," in metadata["thumbnails"].value
    assert "| prompt_id" in metadata["preview"].value
    assert metadata["model_loads"].value == 1
    assert Path(metadata["images_dir"].value).is_dir()


def test_many_prompt_sets_run_as_one_run_per_backend_with_one_load(
    dagster_instance, make_resources, prompts_dir
):
    (prompts_dir / "second.csv").write_text(SECOND_CSV)
    (prompts_dir / "third.csv").write_text(SECOND_CSV.replace("ramen", "noodles"))
    resources = make_resources()
    results = run(["example", "second", "third"], LOCAL, dagster_instance, resources)

    assert all(result.success for result in results)
    assert len(results) == 4  # prompts, one per backend, comparison
    # The runs are those of the project's jobs, the ones the UI and the sensors launch.
    assert [r.dagster_run.job_name for r in results] == [
        "prepare_prompts",
        "generate_images",
        "generate_images",
        "compare_backends",
    ]
    steps = load_run_metadata(storage_base(resources), "steps")
    images_steps = steps[steps.asset == "images"]
    assert len(images_steps) == 6  # a step row per partition, as if each ran alone
    assert images_steps.groupby("backend")["model_loads"].sum().to_dict() == {
        "flux_schnell": 1,
        "sdxl_turbo": 1,
    }
    assert images_steps.groupby("backend")["run_id"].nunique().eq(1).all()
    # The speed mode is in every step row of a local backend: compile off by default.
    assert set(images_steps["compile_mode"]) == {"off"} and images_steps["recompiles"].eq(0).all()
    for prompt_set in ("example", "second", "third"):
        event = dagster_instance.get_latest_materialization_event(dg.AssetKey("backend_comparison"))
        assert event is not None
        gallery = storage_base(resources) / "reports" / prompt_set / "gallery.html"
        assert gallery.exists() and "sdxl_turbo" in gallery.read_text()
    # Each partition's materialization carries its own counts.
    records = dagster_instance.fetch_materializations(dg.AssetKey("images"), limit=10).records
    rows = {r.partition_key: r.asset_materialization.metadata["rows"].value for r in records}
    assert rows["flux_schnell|second"] == 2 and rows["flux_schnell|example"] == 4
    checks = [
        e
        for result in results
        for e in result.get_asset_check_evaluations()
        if e.check_name == "every_image_generated"
    ]
    assert sorted(e.partition for e in checks) == sorted(
        f"{b}|{s}" for b in LOCAL for s in ("example", "second", "third")
    )
    assert all(e.passed for e in checks)


def test_second_materialization_generates_nothing_and_calls_no_pipeline(
    dagster_instance, make_resources, monkeypatch
):
    resources = make_resources()
    run(["example"], LOCAL, dagster_instance, resources)
    base = storage_base(resources)
    before = {p: p.stat().st_mtime_ns for p in (base / "images").rglob("*.png")}
    drawn = {p: p.stat().st_mtime_ns for p in (base / "reports").rglob("*") if p.is_file()}
    assert any(p.name == "gallery.html" for p in drawn)

    def no_model_work(*args, **kwargs):
        raise AssertionError("a re-run must not load or call a pipeline")

    for pipeline_class in (FluxPipeline, StableDiffusionXLPipeline, StableVideoDiffusionPipeline):
        monkeypatch.setattr(pipeline_class, "from_pretrained", no_model_work)
        monkeypatch.setattr(pipeline_class, "__call__", no_model_work)
    # Scores and clips are reused as well: CLIP is not even loaded.
    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_model_work)
    results = run(["example"], LOCAL, dagster_instance, resources)

    assert all(result.success for result in results)
    after = {p: p.stat().st_mtime_ns for p in (base / "images").rglob("*.png")}
    assert after == before
    # Nothing the gallery and chart are drawn from changed: they are kept, not redrawn.
    assert {p: p.stat().st_mtime_ns for p in (base / "reports").rglob("*") if p.is_file()} == drawn
    # A run that makes nothing writes counts, not one row per existing image.
    images = load_run_metadata(base, "images", history=True)
    assert not images.run_id.isin([r.run_id for r in results]).any()
    steps = load_run_metadata(base, "steps")
    rerun = steps[steps.run_id.isin([r.run_id for r in results])]
    assert (rerun["model_loads"] == 0).all()
    made = rerun[rerun["asset"] == "images"]
    assert made["skipped_existing"].sum() == sum(EXPECTED_IMAGES.values())
    assert (made["generated"] == 0).all()
    quality = pd.read_parquet(base / "tables/quality/flux_schnell/example.parquet")
    assert quality["scored"].all() and not quality["newly_scored"].any()


def test_changed_prompt_generates_only_the_changed_images(
    dagster_instance, make_resources, prompts_dir
):
    resources = make_resources()
    run(["example"], ["sdxl_turbo"], dagster_instance, resources)
    gallery = storage_base(resources) / "reports" / "example" / "gallery.html"
    assert "quiet city street" not in gallery.read_text()
    csv = prompts_dir / "example.csv"
    csv.write_text(csv.read_text().replace("neon city street", "quiet city street"))
    results = run(["example"], ["sdxl_turbo"], dagster_instance, resources)
    assert "quiet city street" in gallery.read_text()  # a changed keeper redraws the gallery
    images = load_run_metadata(storage_base(resources), "images", history=True)
    latest = images[images.run_id == results[1].run_id]
    assert latest["status"].tolist() == ["ok"]  # no rows for the two images it found
    assert latest["prompt_id"].tolist() == ["city"]
    steps = load_run_metadata(storage_base(resources), "steps")
    (step,) = steps[(steps.run_id == results[1].run_id) & (steps.asset == "images")].to_dict(
        "records"
    )
    assert (step["generated"], step["skipped_existing"]) == (1, 2)


def test_rejected_rows_are_kept_counted_and_flagged(dagster_instance, make_resources, prompts_dir):
    (prompts_dir / "mixed.csv").write_text(
        "prompt_id,prompt,style,seed\n"
        "good,a lighthouse in a storm,cinematic,1\n"
        "bad-style,a cat,cubism,2\n"
        "bad-seed,a dog,none,many\n"
    )
    resources = make_resources()
    results = run(["mixed"], ["sdxl_turbo"], dagster_instance, resources)
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
    assert check.partition == "mixed"


def test_a_file_without_valid_rows_fails_with_one_clear_message(
    dagster_instance, make_resources, prompts_dir
):
    (prompts_dir / "broken.csv").write_text("text\nhello\n")
    results = run(
        ["broken"], ["sdxl_turbo"], dagster_instance, make_resources(), raise_on_error=False
    )
    assert len(results) == 1 and not results[0].success
    failure = next(e for e in results[0].all_events if e.event_type_value == "STEP_FAILURE")
    assert "broken.csv: missing required column 'prompt'" in failure.step_failure_data.error.message


def test_a_bad_file_among_many_fails_alone(dagster_instance, make_resources, prompts_dir):
    (prompts_dir / "broken.csv").write_text("text\nhello\n")
    resources = make_resources()
    results = run(["example", "broken"], ["sdxl_turbo"], dagster_instance, resources)

    assert all(result.success for result in results)
    checks = {e.partition: e for e in results[0].get_asset_check_evaluations()}
    assert checks["example"].passed
    assert not checks["broken"].passed
    assert checks["broken"].severity == dg.AssetCheckSeverity.ERROR
    assert "missing required column 'prompt'" in checks["broken"].metadata["reasons"].value
    images = load_run_metadata(storage_base(resources), "images")
    assert set(images["prompt_set"]) == {"example"}


@pytest.mark.parametrize("backend", LOCAL)
def test_step_fails_only_when_nothing_succeeded(
    dagster_instance, make_resources, backend, tmp_path
):
    working = make_resources()[backend]
    broken = type(working)(**{**working.model_dump(), "model": str(tmp_path / "missing-model")})
    resources = make_resources(**{backend: broken})
    results = run(["example"], [backend], dagster_instance, resources, raise_on_error=False)
    assert results[0].success and not results[1].success
    failure = next(e for e in results[1].all_events if e.event_type_value == "STEP_FAILURE")
    assert "missing-model" in failure.step_failure_data.error.message


def test_a_run_spanning_a_set_without_prompts_makes_the_others(
    dagster_instance, make_resources, prompts_dir
):
    # As in the daemon: the bad file was prepared alone and failed, so it has no prompts; a
    # single run over every set (a backfill of "all partitions") still makes the others.
    (prompts_dir / "broken.csv").write_text("text\nhello\n")
    (prompts_dir / "zeta.csv").write_text("prompt\na red fox in the snow\n")
    resources = make_resources()
    dagster_instance.add_dynamic_partitions("prompt_sets", ["example", "broken", "zeta"])
    for prompt_set in ("example", "broken", "zeta"):
        run([prompt_set], [], dagster_instance, resources, raise_on_error=False)
    enhanced = dagster_instance.get_materialized_partitions(dg.AssetKey("enhanced_prompts"))
    assert enhanced == {"example", "zeta"}

    tags = range_tags("sdxl_turbo|example", "sdxl_turbo|zeta")
    result = defs.resolve_job_def("generate_images").execute_in_process(
        instance=dagster_instance, resources=resources, tags=tags
    )

    assert result.success
    images = load_run_metadata(storage_base(resources), "images")
    assert sorted(images["prompt_set"].unique()) == ["example", "zeta"]
    logs = [e.user_message for e in dagster_instance.all_logs(result.run_id)]
    assert any("'broken' has no enhanced prompts" in message for message in logs)


# What a backfill of the per-backend assets runs, in a fresh process, saying at the end
# whether anything imported torch.
BACKFILL_REPORTING_TORCH = """
import sys
import dagster as dg
from imagegen_pipeline import cli
from imagegen_pipeline.definitions import defs
from imagegen_pipeline.local_runner import range_tags

first, last, *backends = sys.argv[1:]
with dg.DagsterInstance.get() as instance:
    for backend in backends:
        result = defs.resolve_job_def("generate_images").execute_in_process(
            instance=instance,
            tags=range_tags(f"{backend}|{first}", f"{backend}|{last}"),
        )
        assert result.success
print("torch imported:", "torch" in sys.modules)
"""


def test_a_run_with_nothing_to_make_never_imports_torch(
    tmp_path, prompts_dir, tiny_model_variables, monkeypatch
):
    """Steps decide what exists from the settings alone: a backfill over finished sets creates
    no model object, so its run never pays for importing torch, diffusers or open_clip
    (seconds each, inside the GPU pool's slot)."""
    (prompts_dir / "second.csv").write_text(SECOND_CSV)
    env = {
        **tiny_model_variables,
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "IMAGEGEN_STORAGE": str(tmp_path / "storage"),
        "IMAGEGEN_PROMPTS_DIR": str(prompts_dir),
    }
    # `imagegen demo` makes everything here, where torch is imported already; only the
    # backfill's process has to start without it.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["demo", "--backends", *LOCAL]) == 0
    first_runs = set(load_run_metadata(tmp_path / "storage", "steps").run_id)
    backfill = subprocess.run(
        [sys.executable, "-c", BACKFILL_REPORTING_TORCH, "example", "second", *LOCAL],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert backfill.returncode == 0, backfill.stdout[-3000:] + backfill.stderr[-3000:]
    assert "torch imported: False" in backfill.stdout

    steps = load_run_metadata(tmp_path / "storage", "steps")
    second = steps[~steps.run_id.isin(first_runs)]
    assert set(second.asset) == {"images", "quality", "clips", "video_quality"}
    assert set(second.prompt_set) == {"example", "second"}
    assert set(second.backend) == set(LOCAL)
    assert (second.generated == 0).all() and (second.model_loads == 0).all()
    assert second.device.isna().all()  # no model object was created to run anywhere


def test_a_truncated_png_is_remade_rescored_and_reported(dagster_instance, make_resources):
    """One bad file never fails a step: the thumbnails once failed every re-run on it."""
    resources = make_resources()
    run(["example"], ["sdxl_turbo"], dagster_instance, resources)
    base = storage_base(resources)
    png = sorted((base / "images" / "example" / "sdxl_turbo").rglob("*.png"))[0]
    png.write_bytes(png.read_bytes()[:100])

    results = run(["example"], ["sdxl_turbo"], dagster_instance, resources)
    assert all(result.success for result in results)
    with Image.open(png) as image:
        image.verify()  # made again, whole
    assert len(list((base / "quarantine").rglob("*.png"))) == 1
    (check,) = [
        e
        for result in results
        for e in result.get_asset_check_evaluations()
        if e.check_name == "no_damaged_files"
    ]
    assert not check.passed and check.metadata["damaged"].value == 1
    quality = pd.read_parquet(base / "tables/quality/sdxl_turbo/example.parquet")
    assert quality["newly_scored"].sum() == 1  # only the new file; the others' scores reused
