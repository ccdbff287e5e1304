"""The comparison table, chart and gallery on crafted quality tables."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imagegen_pipeline.defs.comparison.report import backend_summary, bar_chart_png, gallery_html
from imagegen_pipeline.video.writers import write_preview


def png(folder: Path, name: str, seed: int) -> str:
    path = folder / f"{name}.png"
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
        path
    )
    return str(path)


@pytest.fixture
def tables(tmp_path):
    def rows(backend: str, scores: list[float | None], seconds: float, cost: float | None):
        records = []
        for index, (prompt_id, score) in enumerate(zip(["cat", "cat", "owl"], scores, strict=True)):
            exists = score is not None
            records.append(
                {
                    "prompt_id": prompt_id, "image_index": index % 2,
                    "prompt": f"{prompt_id}, detailed", "original_prompt": f"a {prompt_id}",
                    "status": "ok" if exists else "failed",
                    "error": None if exists else "boom", "scored": exists, "is_blank": False,
                    "path": png(tmp_path, f"{backend}{index}", index) if exists else None,
                    "clip_score": score, "aesthetic": 0.5 if exists else None, "seed": index,
                    "generation_seconds": seconds if exists else None, "generation_cost_usd": cost,
                    "laion_aesthetic": None, "clip_truncated": False,
                }
            )  # fmt: skip
        return pd.DataFrame(records)

    quality = {
        "flux_schnell": rows("flux", [30.0, 20.0, 25.0], seconds=2.0, cost=None),
        "gemini": rows("gemini", [35.0, None, 5.0], seconds=4.0, cost=0.039),
    }
    preview = tmp_path / "clip.webp"
    write_preview(preview, [Image.new("RGB", (32, 32), c) for c in ("red", "blue")], fps=7)
    clips = {
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
    return quality, clips


def test_one_summary_row_per_backend(tables):
    quality, clips = tables
    summary = backend_summary(quality, clips).set_index("backend")
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
    quality, clips = tables
    summary = backend_summary(quality, clips)
    page = gallery_html("example", summary, quality, clips, bar_chart_png(summary, "x"))
    assert page.startswith("<!doctype html>")
    sections = re.findall(r'<section class="prompt" id="(\w+)">(.*?)</section>', page, re.S)
    assert [prompt for prompt, _ in sections] == ["cat", "owl"]
    for _, body in sections:
        assert body.index("flux_schnell") < body.index("gemini")  # side by side, same order
    cat, owl = (body for _, body in sections)
    assert cat.count("data:image/jpeg") == 3 and "boom" in cat  # gemini's failed image shown
    assert owl.count("data:image/webp") == 1 and "temporal 0.900" in owl
    assert "$0.0390" in page and "CLIP 30.0" in page
    assert not re.search(r'src="(?!data:)', page)  # every image is embedded


def test_worst_first_puts_the_lowest_scoring_prompt_first(tables):
    quality, clips = tables
    summary = backend_summary(quality, clips)
    by_id = gallery_html("x", summary, quality, clips, b"", worst_first=False)
    worst = gallery_html("x", summary, quality, clips, b"", worst_first=True)
    order = lambda page: re.findall(r'<section class="prompt" id="(\w+)"', page)  # noqa: E731
    assert order(by_id) == ["cat", "owl"]
    # cat has gemini's failed image, which counts as worst of all; then owl's 5.0.
    assert order(worst) == ["cat", "owl"]
    quality["gemini"].loc[1, ["scored", "clip_score", "status"]] = [True, 40.0, "ok"]
    quality["gemini"].loc[1, "path"] = quality["gemini"].loc[0, "path"]
    assert order(gallery_html("x", summary, quality, clips, b"", worst_first=True)) == [
        "owl",
        "cat",
    ]
    assert "ordered worst first" in worst
