"""End to end on tiny models: images -> quality -> clips -> video_quality -> backend_comparison."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

from imagegen_pipeline.definitions import defs
from imagegen_pipeline.defs.comparison.assets import by_set
from imagegen_pipeline.defs.quality.resources import QualityThresholds
from imagegen_pipeline.local_runner import materialize_prompt_sets
from imagegen_pipeline.registry import SVD
from imagegen_pipeline.run_metadata import load_run_metadata
from imagegen_pipeline.video.video_files import read_mp4_frames
from tests.conftest import (
    ARTIFACTS,
    chromium_screenshot,
    needs_chromium,
    resources_maker,
    temporary_instance,
    write_prompts,
)

# The tiny SVD's settings come from the registry, wherever the tiny models are used.
TINY_SVD = SVD.tiny_defaults

pytestmark = pytest.mark.slow

BACKENDS = ["flux_schnell", "sdxl_turbo"]


def check_results(results: list[dg.ExecuteInProcessResult]) -> dict[str, bool]:
    """Every quality check evaluation of the runs, by "<check name> <partition>"."""
    outcomes = {}
    for result in results:
        for evaluation in result.get_asset_check_evaluations():
            if evaluation.asset_key != dg.AssetKey("quality"):
                continue
            key = f"{evaluation.check_name} {evaluation.partition}"
            outcomes[key] = evaluation.passed
    return outcomes


def table(storage: Path, asset: str, prompt_set: str, backend: str | None = None) -> pd.DataFrame:
    folder = storage / "tables" / asset / (backend or "")
    return pd.read_parquet(folder / f"{prompt_set}.parquet")


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Tiny models run tiny kernels: extra threads only spin, and stall when cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_flux, tiny_sdxl, tiny_svd, tiny_open_clip):
    """The whole graph materialized once for the module: (results, resources, storage,
    instance). The tests below read it in file order; the one that damages an image and
    re-runs with strict checks comes last."""
    root = tmp_path_factory.mktemp("first-run")
    resources = resources_maker(
        root, write_prompts(root), tiny_flux, tiny_sdxl, tiny_svd, tiny_open_clip
    )()
    with temporary_instance(root / "dagster_home") as instance:
        results = materialize_prompt_sets(
            defs, ["example"], BACKENDS, instance=instance, resources=resources
        )
        yield results, resources, root / "storage", instance


def test_the_whole_graph_on_tiny_models(first_run):
    results, resources, storage, dagster_instance = first_run
    assert [r.success for r in results] == [True] * 4  # prompts, 2 backends, comparison
    checks = check_results(results)
    assert len(checks) == 3 * len(BACKENDS)
    # Noise is never blank and every prompt has images; the CLIP threshold is a WARN only.
    assert all(passed for name, passed in checks.items() if "clip_scores" not in name)

    for backend, prompts in [
        ("flux_schnell", {"cat", "city", "owl"}),
        ("sdxl_turbo", {"cat", "city"}),
    ]:
        report = table(storage, "quality", "example", backend)
        assert set(report["prompt_id"]) == prompts
        assert report["scored"].all() and not report["is_blank"].any()
        assert report["clip_score"].between(0, 100).all()
        for column in ("seconds", "cost_usd", "seed", "status", "model_id", "generation_seconds"):
            assert column in report
        assert report["original_prompt"].str.len().lt(report["prompt"].str.len()).all()

        # first_n with n=1: one clip per prompt, made from image 0.
        clips = table(storage, "clips", "example", backend)
        assert set(clips["prompt_id"]) == prompts and (clips["image_index"] == 0).all()
        assert (clips["status"] == "ok").all()
        for row in clips.to_dict("records"):
            frames = read_mp4_frames(Path(row["path"]).read_bytes())
            assert len(frames) == TINY_SVD["num_frames"]
            assert frames[0].size == (TINY_SVD["width"], TINY_SVD["height"])
            with Image.open(row["preview_path"]) as preview:
                assert preview.n_frames == TINY_SVD["num_frames"]
        clip_scores = table(storage, "video_quality", "example", backend)
        assert clip_scores["scored"].all()
        assert clip_scores["temporal_consistency"].between(-1, 1).all()

    comparison = table(storage, "backend_comparison", "example")
    assert list(comparison["backend"]) == BACKENDS
    assert list(comparison["images"]) == [4, 3] and list(comparison["clips"]) == [3, 2]
    gallery = storage / "reports" / "example" / "gallery.html"
    page = gallery.read_text()
    assert page.count('<section class="prompt"') == 3
    assert page.count("data:image/jpeg;base64,") == 7  # every image, embedded
    assert page.count("data:image/webp;base64,") == 5  # every clip preview, embedded
    assert 'src="/' not in page and "file://" not in page  # self-contained
    assert (storage / "reports" / "example" / "comparison.png").stat().st_size > 10_000
    assert len(load_run_metadata(storage, "clips")) == 5

    # A re-run makes no image and no clip: everything is found by its content address.
    again = materialize_prompt_sets(
        defs, ["example"], BACKENDS, instance=dagster_instance, resources=resources
    )
    assert all(r.success for r in again)
    for backend in BACKENDS:
        assert set(table(storage, "clips", "example", backend)["status"]) == {"skipped_existing"}
        report = table(storage, "quality", "example", backend)
        assert set(report["status"]) == {"skipped_existing"}
        assert report["generation_seconds"].gt(0).all()  # still known from the first run
    steps = load_run_metadata(storage, "steps")
    clip_steps = steps[steps["asset"] == "clips"].sort_values("started_at")
    assert list(clip_steps["generated"]) == [3, 2, 0, 0]


def test_every_prompt_keeps_its_images_by_default(first_run):
    # No best-of-N column: every image made is kept (cat asks for 2), ranked by CLIP score.
    results, _, storage, _ = first_run
    for backend, wanted in [("flux_schnell", 3), ("sdxl_turbo", 2)]:
        keepers = table(storage, "keepers", "example", backend)
        assert keepers["kept"].all() and len(keepers) == wanted + 1
        assert (keepers["scorer"] == "clip").all() and not keepers["below_gate"].any()
        assert list(keepers["score"]) == list(keepers["clip_score"])
        clips = table(storage, "clips", "example", backend)
        assert set(clips["source_image_id"]) <= set(keepers["image_id"])
    checks = {
        f"{e.check_name} {e.partition}": e.passed
        for r in results
        for e in r.get_asset_check_evaluations()
        if e.asset_key == dg.AssetKey("keepers")
    }
    assert len(checks) == 2 * len(BACKENDS) and all(checks.values())
    page = (storage / "reports" / "example" / "gallery.html").read_text()
    assert page.count("<b>KEEPER · clip ") == 7  # every image is a keeper, with its score


@needs_chromium
def test_the_gallery_renders_in_headless_chromium(first_run, tmp_path):
    _, _, storage, _ = first_run
    gallery = storage / "reports" / "example" / "gallery.html"
    # Taken once every thumbnail is decoded (see chromium_screenshot).
    screenshot = chromium_screenshot(
        gallery.resolve().as_uri(), "gallery.png", tmp_path / "chromium"
    )
    shutil.copyfile(gallery, ARTIFACTS / "gallery.html")
    with Image.open(screenshot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[:2] == (900, 1280)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    # A white page with text has a few hundred colours; the noise thumbnails bring thousands.
    assert len(colours) > 5000, f"only {len(colours)} colours: were the thumbnails drawn?"
    assert pixels.std() > 20


def test_checks_fail_on_a_blank_image_and_a_high_threshold(first_run, monkeypatch):
    # Changes the module's outputs (a blank image, a strict re-run): it runs last.
    _, resources, storage, dagster_instance = first_run
    report = table(storage, "quality", "example", "flux_schnell")
    # The model makes the cat's first image again, as a "safety filter" grey. (Overwriting the
    # file under its name would not do: a file that differs from its row is damage, moved to
    # the quarantine and made again.)
    Path(report.loc[report["prompt_id"] == "cat", "path"].iloc[0]).unlink()
    make = FluxPipeline.__call__

    def grey(pipeline, *args, **kwargs):
        output = make(pipeline, *args, **kwargs)
        output.images = [Image.new("RGB", image.size, (128, 128, 128)) for image in output.images]
        return output

    monkeypatch.setattr(FluxPipeline, "__call__", grey)

    strict = dict(resources, quality_thresholds=QualityThresholds(min_clip_score=101.0))
    rerun = materialize_prompt_sets(
        defs, ["example"], ["flux_schnell"], instance=dagster_instance, resources=strict
    )
    checks = check_results(rerun)
    partition = "flux_schnell|example"
    assert checks[f"no_blank_images {partition}"] is False
    assert checks[f"clip_scores_mostly_above_threshold {partition}"] is False
    assert checks[f"every_prompt_has_a_scored_image {partition}"] is True
    # The blank image is not animated: the cat's clip moves on to its next image.
    clips = table(storage, "clips", "example", "flux_schnell")
    assert clips.loc[clips["prompt_id"] == "cat", "image_index"].tolist() == [1]


def test_backends_keep_the_registry_order_whatever_order_dagster_loads_them_in() -> None:
    table = pd.DataFrame({"prompt_id": ["p1"]})
    loaded = {
        "gemini|a": table,
        "sdxl_turbo|b": table,
        "sdxl_turbo|a": table,
        "flux_schnell|a": table,
    }
    grouped = by_set(loaded)
    assert list(grouped["a"]) == ["flux_schnell", "sdxl_turbo", "gemini"]
    assert list(grouped["b"]) == ["sdxl_turbo"]
