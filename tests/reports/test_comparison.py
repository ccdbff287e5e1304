"""The comparison table, chart and gallery on crafted quality tables."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imagegen_pipeline.steps.comparison import backend_summary, bar_chart_png, gallery_html
from imagegen_pipeline.video.video_files import webp_preview_bytes
from tests.conftest import ARTIFACTS, chromium_screenshot, needs_chromium

HOSTILE = '<script>alert(1)</script> "quoted"'


def read_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


def png(folder: Path, name: str, seed: int) -> str:
    path = folder / f"{name}.png"
    noise = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    return str(path)


def quality_rows(
    folder: Path, backend: str, scores: list[float | None], seconds: float, cost: float | None
) -> pd.DataFrame:
    records = []
    for index, (prompt_id, score) in enumerate(zip(["cat", "cat", "owl"], scores, strict=True)):
        exists = score is not None
        records.append(
            {
                "prompt_id": prompt_id,
                "image_index": index % 2,
                "prompt": f"{prompt_id}, detailed",
                "original_prompt": f"a {prompt_id}",
                "status": "ok" if exists else "failed",
                "error": None if exists else "boom",
                "scored": exists,
                "is_blank": False,
                "path": png(folder, f"{backend}{index}", index) if exists else None,
                "clip_score": score,
                "aesthetic": 0.5 if exists else None,
                "seed": index,
                "generation_seconds": seconds if exists else None,
                "generation_cost_usd": cost,
                "laion_aesthetic": None,
                "clip_truncated": False,
            }
        )
    return pd.DataFrame(records)


@pytest.fixture
def tables(tmp_path):
    quality = {
        "flux_schnell": quality_rows(tmp_path, "flux", [30.0, 20.0, 25.0], seconds=2.0, cost=None),
        "gemini": quality_rows(tmp_path, "gemini", [35.0, None, 5.0], seconds=4.0, cost=0.039),
    }
    preview = tmp_path / "video_clip.webp"
    preview.write_bytes(
        webp_preview_bytes([Image.new("RGB", (32, 32), c) for c in ("red", "blue")], fps=7)
    )
    video_quality = {
        "flux_schnell": pd.DataFrame(
            [
                {
                    "prompt_id": "owl",
                    "image_index": 0,
                    "status": "ok",
                    "scored": True,
                    "preview_path": str(preview),
                    "temporal_consistency": 0.9,
                    "source_similarity": 0.8,
                }
            ]
        )
    }
    return quality, video_quality


def sections(page: str) -> list[tuple[str, str]]:
    return re.findall(r'<section class="prompt" id="(\w+)">(.*?)</section>', page, re.S)


def test_one_summary_row_per_backend(tables):
    quality, video_quality = tables
    summary = backend_summary(quality, video_quality).set_index("backend")
    assert summary.loc["flux_schnell", "images"] == 3 and summary.loc["gemini", "failed"] == 1
    assert summary.loc["flux_schnell", "mean_clip_score"] == pytest.approx(25.0)
    assert summary.loc["gemini", "median_clip_score"] == pytest.approx(20.0)
    assert summary.loc["flux_schnell", "cost_per_image_usd"] == 0.0  # local: free
    assert summary.loc["gemini", "cost_per_image_usd"] == pytest.approx(0.039)
    assert summary.loc["gemini", "seconds_per_image"] == pytest.approx(4.0)
    assert summary.loc["flux_schnell", "clips"] == 1 and summary.loc["gemini", "clips"] == 0
    assert summary.loc["flux_schnell", "mean_temporal_consistency"] == pytest.approx(0.9)


def test_chart_is_a_png(tables):
    chart = bar_chart_png(backend_summary(*tables), "example")
    with Image.open(io.BytesIO(chart)) as image:
        assert image.format == "PNG" and image.size == (900, 600)


def test_gallery_is_self_contained_and_groups_backends_by_prompt(tables):
    quality, video_quality = tables
    summary = backend_summary(quality, video_quality)
    chart = bar_chart_png(summary, "x")
    page = gallery_html("example", summary, quality, video_quality, chart, read_bytes=read_bytes)
    assert page.startswith("<!doctype html>")
    found = sections(page)
    assert [prompt for prompt, _ in found] == ["cat", "owl"]
    for _, body in found:
        assert body.index("flux_schnell") < body.index("gemini")  # side by side, same order
    cat, owl = (body for _, body in found)
    assert cat.count("data:image/jpeg") == 3 and "boom" in cat  # gemini's failed image shown
    assert owl.count("data:image/webp") == 1 and "temporal 0.900" in owl
    assert "$0.0390" in page and "CLIP 30.0" in page
    assert not re.search(r'src="(?!data:)', page)  # every image is embedded
    assert '<table class="summary">' in page and "<td>flux_schnell</td>" in page


def test_every_file_is_read_through_read_bytes(tables):
    quality, video_quality = tables
    summary = backend_summary(quality, video_quality)
    asked = []

    def recording(path: str) -> bytes:
        asked.append(path)
        return read_bytes(path)

    gallery_html("x", summary, quality, video_quality, b"", read_bytes=recording)
    assert len(asked) == 5 + 1  # five scored images and one video clip preview
    assert all(isinstance(path, str) for path in asked)


def test_an_unreadable_preview_is_left_out(tables):
    quality, video_quality = tables
    summary = backend_summary(quality, video_quality)

    def no_previews(path: str) -> bytes:
        if path.endswith(".webp"):
            raise FileNotFoundError(path)
        return read_bytes(path)

    page = gallery_html("x", summary, quality, video_quality, b"", read_bytes=no_previews)
    assert "data:image/webp" not in page and page.count("data:image/jpeg") == 5


def test_a_truncated_image_shows_as_unreadable_and_the_rest_render(tables):
    quality, video_quality = tables
    damaged = Path(quality["flux_schnell"].loc[1, "path"])
    damaged.write_bytes(damaged.read_bytes()[:200])
    summary = backend_summary(quality, video_quality)
    page = gallery_html("x", summary, quality, video_quality, b"", read_bytes=read_bytes)
    assert page.count("data:image/jpeg") == 4  # the other four scored images
    assert "unreadable" in page and "OSError" in page


def test_flags_and_optional_scores_are_captioned(tables):
    quality, video_quality = tables
    quality["flux_schnell"].loc[0, ["is_blank", "clip_truncated"]] = [True, True]
    quality["flux_schnell"]["laion_aesthetic"] = [5.5, None, None]
    summary = backend_summary(quality, video_quality)
    page = gallery_html("x", summary, quality, video_quality, b"", read_bytes=read_bytes)
    assert page.count('<span class="flag">BLANK</span>') == 1
    assert page.count('<span class="flag">prompt truncated</span>') == 1
    assert page.count("LAION 5.50") == 1


def test_worst_first_puts_the_lowest_scoring_prompt_first(tables):
    quality, video_quality = tables
    summary = backend_summary(quality, video_quality)

    def page(worst_first: bool) -> str:
        return gallery_html(
            "x",
            summary,
            quality,
            video_quality,
            b"",
            read_bytes=read_bytes,
            worst_first=worst_first,
        )

    def order(worst_first: bool) -> list[str]:
        return [prompt for prompt, _ in sections(page(worst_first))]

    assert order(worst_first=False) == ["cat", "owl"]
    # cat has gemini's failed image, which counts as worst of all; then owl's 5.0.
    assert order(worst_first=True) == ["cat", "owl"]
    assert "ordered worst first" in page(worst_first=True)
    quality["gemini"].loc[1, ["scored", "clip_score", "status"]] = [True, 40.0, "ok"]
    quality["gemini"].loc[1, "path"] = quality["gemini"].loc[0, "path"]
    assert order(worst_first=True) == ["owl", "cat"]


def test_prompts_paths_and_errors_are_escaped(tables):
    quality, video_quality = tables
    gemini = quality["gemini"]
    gemini["prompt_id"] = gemini["prompt_id"].replace("owl", HOSTILE)
    gemini.loc[1, "error"] = HOSTILE
    gemini.loc[0, ["prompt", "original_prompt"]] = [HOSTILE, HOSTILE]
    summary = backend_summary(quality, video_quality)
    summary.loc[0, "backend"] = HOSTILE
    page = gallery_html(HOSTILE, summary, quality, video_quality, b"", read_bytes=read_bytes)
    assert "<script>" not in page and '"quoted"' not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&#34;quoted&#34;" in page  # quotes too: the values also land in attributes
    assert f'id="{HOSTILE}"' not in page and 'title="&lt;script&gt;' in page


def test_the_template_renders_without_any_quality_rows():
    quality = {"flux_schnell": pd.DataFrame()}
    summary = backend_summary(quality, {})
    page = gallery_html("empty", summary, quality, {}, b"", read_bytes=read_bytes)
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert "0 prompts · 1 backends" in page and "<section" not in page
    assert "<td>flux_schnell</td>" in page
    empty = gallery_html("empty", pd.DataFrame(), {}, {}, b"", read_bytes=read_bytes)
    assert "0 prompts · 0 backends" in empty


@needs_chromium
def test_the_gallery_renders_in_headless_chromium(tables, tmp_path):
    quality, video_quality = tables
    summary = backend_summary(quality, video_quality)
    gallery = tmp_path / "gallery.html"
    gallery.write_text(
        gallery_html(
            "example",
            summary,
            quality,
            video_quality,
            bar_chart_png(summary, "example"),
            read_bytes=read_bytes,
        )
    )
    # Not gallery.png: the end-to-end test's screenshot of a real run has that name.
    screenshot = chromium_screenshot(
        gallery.resolve().as_uri(), "comparison-gallery.png", tmp_path / "chromium"
    )
    shutil.copyfile(gallery, ARTIFACTS / "comparison-gallery.html")
    with Image.open(screenshot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[:2] == (900, 1280)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    # A white page with text has a few hundred colours; the noise thumbnails bring thousands.
    assert len(colours) > 5000, f"only {len(colours)} colours: were the thumbnails drawn?"
    assert pixels.std() > 20


def test_an_image_made_with_loras_is_captioned_with_them(tables):
    quality, video_quality = tables
    adapters = [
        {"source": "styles/brand.safetensors", "sha256": "ab" * 32, "scale": 0.8},
        {"source": "detail-org/detail-lora", "sha256": "cd" * 32, "scale": 1.0},
    ]
    quality["flux_schnell"]["loras"] = [json.dumps(adapters), "", ""]
    summary = backend_summary(quality, video_quality)
    page = gallery_html("x", summary, quality, video_quality, b"", read_bytes=read_bytes)
    assert page.count("LoRA brand.safetensors ×0.8, detail-lora ×1") == 1


def test_steered_images_are_grouped_by_lora_and_control_and_show_their_map(tables, tmp_path):
    from imagegen_pipeline.steps.comparison import steering_summary

    quality, video_quality = tables
    assert steering_summary(quality).empty  # nothing steered: no table
    flux = quality["flux_schnell"]
    lora = json.dumps([{"source": "styles/brand.safetensors", "sha256": "ab", "scale": 0.8}])
    control = json.dumps(
        {"image": "/x/layout.png", "sha256": "cd", "type": "canny", "scale": 1.0}
        | {"used_as": "controlnet"}
    )
    flux["image_id"] = ["i0", "i1", "i2"]
    quality["gemini"]["image_id"] = ["g0", "g1", "g2"]
    flux["loras"] = [lora, lora, ""]
    flux["control"] = [control, "", ""]
    Image.new("RGB", (40, 40), "white").save(
        flux.loc[0, "path"].removesuffix(".png") + ".control.png"
    )

    steering = steering_summary(quality).set_index(["backend", "loras", "control"])
    assert (
        steering.loc[("flux_schnell", "brand.safetensors ×0.8", "canny ×1 layout.png"), "images"]
        == 1
    )
    assert (
        steering.loc[("flux_schnell", "brand.safetensors ×0.8", "none"), "mean_clip_score"] == 20.0
    )
    assert steering.loc[("flux_schnell", "none", "none"), "images"] == 1
    assert steering.loc[("gemini", "none", "none"), "images"] == 2  # the failed one unscored

    summary = backend_summary(quality, video_quality)
    page = gallery_html(
        "x",
        summary,
        quality,
        video_quality,
        b"",
        read_bytes=read_bytes,
        steering=steering_summary(quality),
    )
    assert "By LoRA and ControlNet" in page
    assert page.count('class="control-map"') == 1
    assert "control canny ×1 layout.png" in page
