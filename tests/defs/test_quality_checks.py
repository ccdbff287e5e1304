"""The quality checks on crafted reports, and how the new assets sit in the graph."""

from __future__ import annotations

import dagster as dg
import pandas as pd

from imagegen_pipeline.definitions import defs
from imagegen_pipeline.defs.gpu import GPU_POOL
from imagegen_pipeline.defs.quality.checks import (
    clip_scores_mostly_above_threshold,
    every_prompt_has_a_scored_image,
    no_blank_images,
)
from imagegen_pipeline.defs.quality.resources import QualityThresholds


def report(clip_scores, *, blank=None, scored=None, prompts=None) -> pd.DataFrame:
    count = len(clip_scores)
    return pd.DataFrame(
        {
            "prompt_id": prompts or [f"p{i}" for i in range(count)],
            "image_index": [0] * count,
            "status": ["ok"] * count,
            "path": [f"{i}.png" for i in range(count)],
            "scored": scored or [True] * count,
            "is_blank": blank or [False] * count,
            "clip_score": clip_scores,
            "contrast": [0.2] * count,
            "dominant_colour_share": [0.1] * count,
            "error": [None] * count,
        }
    )


def test_blank_images_fail_with_error_severity():
    assert no_blank_images(report([30.0, 28.0])).passed
    result = no_blank_images(report([30.0, 28.0], blank=[False, True]))
    assert not result.passed and result.severity == dg.AssetCheckSeverity.ERROR
    assert result.metadata["blank_images"].value == 1
    # An unscored image is not judged blank: it has no pixels to judge.
    assert no_blank_images(report([30.0, None], blank=[False, True], scored=[True, False])).passed


def test_low_clip_scores_warn_above_the_allowed_share():
    thresholds = QualityThresholds(min_clip_score=20.0, max_low_score_share=0.25)
    scores = [30.0, 25.0, 22.0, 10.0]  # one in four under 20: exactly the allowed share
    result = clip_scores_mostly_above_threshold(report(scores), quality_thresholds=thresholds)
    assert result.passed and result.metadata["low_score_share"].value == 0.25
    strict = QualityThresholds(min_clip_score=23.0, max_low_score_share=0.25)
    result = clip_scores_mostly_above_threshold(report(scores), quality_thresholds=strict)
    assert not result.passed and result.severity == dg.AssetCheckSeverity.WARN


def test_every_prompt_needs_a_scored_image():
    two_per_prompt = dict(prompts=["a", "a", "b", "b"])
    assert every_prompt_has_a_scored_image(report([1.0, None, None, 2.0], **two_per_prompt)).passed
    result = every_prompt_has_a_scored_image(
        report([1.0, 2.0, None, None], scored=[True, True, False, False], **two_per_prompt)
    )
    assert not result.passed and result.severity == dg.AssetCheckSeverity.ERROR
    assert result.metadata["prompts_without_scored_image"].value == 1


def test_the_new_assets_in_the_graph():
    graph = defs.resolve_asset_graph()
    parents = {
        name: {key.to_user_string() for key in graph.get(dg.AssetKey(name)).parent_keys}
        for name in ("quality", "clips", "video_quality", "backend_comparison")
    }
    assert parents == {
        "quality": {"images", "enhanced_prompts"},
        "clips": {"keepers"},
        "video_quality": {"clips"},
        "backend_comparison": {"keepers", "video_quality"},
    }
    for name in ("quality", "clips", "video_quality"):
        assets_def = defs.resolve_assets_def(name)
        assert assets_def.op.pool == GPU_POOL
        assert assets_def.op.tags["dagster-celery/queue"] == "gpu"
    groups = {name: graph.get(dg.AssetKey(name)).group_name for name in parents}
    assert groups == {
        "quality": "quality",
        "clips": "clips",
        "video_quality": "quality",
        "backend_comparison": "comparison",
    }
    checks = {key.name for key in graph.asset_check_keys if key.asset_key == dg.AssetKey("quality")}
    assert checks == {
        "no_blank_images",
        "clip_scores_mostly_above_threshold",
        "every_prompt_has_a_scored_image",
    }
    generate = defs.resolve_job_def("generate_images")
    assert {"images", "quality", "clips", "video_quality"} <= {
        key.to_user_string() for key in generate.asset_layer.executable_asset_keys
    }
    assert defs.resolve_job_def("compare_backends") is not None
    resources = defs.get_repository_def().get_top_level_resources()
    assert {"svd", "clip_model", "quality_thresholds"} <= set(resources)
