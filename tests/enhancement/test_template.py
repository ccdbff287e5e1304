"""The offline template enhancer and the prompt checks shared by every enhancer."""

import pandas as pd

from imagegen_pipeline.enhancement import TemplateEnhancer, enhance_prompts
from imagegen_pipeline.enhancement.base import rate_prompt
from imagegen_pipeline.enhancement.template import STYLE_PHRASES
from imagegen_pipeline.text_encoders import count_clip_tokens


def test_style_phrases_and_negatives_follow_the_style():
    enhancer = TemplateEnhancer()
    photo = enhancer.enhance("a red fox in the snow", "photorealistic", "people")
    anime = enhancer.enhance("a red fox in the snow", "anime")

    assert photo.text.startswith("a red fox in the snow, ")
    assert STYLE_PHRASES["photorealistic"] in photo.text
    assert STYLE_PHRASES["anime"] in anime.text
    assert photo.negative_prompt.startswith("people, cartoon")
    assert "photorealistic" in anime.negative_prompt
    assert photo.method == "template" and photo.fallback_reason == ""


def test_enhancement_is_deterministic():
    first = TemplateEnhancer().enhance("a lighthouse at dusk", "cinematic")
    second = TemplateEnhancer().enhance("a lighthouse at dusk", "cinematic")
    assert first == second


def test_prompt_rating_issues():
    assert rate_prompt("a detailed lighthouse on a cliff in a storm").issues == []
    short = rate_prompt("a cat")
    assert short.score == 70 and short.issues[0].startswith("too short")
    generic = rate_prompt("a nice beautiful picture of a harbour town")
    assert "generic words: beautiful, nice, picture" in generic.issues
    contradiction = rate_prompt("a busy street by day and by night, crowded but empty")
    assert "contradiction: 'day' and 'night'" in contradiction.issues
    assert "contradiction: 'empty' and 'crowded'" in contradiction.issues
    long = rate_prompt(" ".join(["a very long winding description"] * 20))
    assert any(issue.startswith("too long") for issue in long.issues)


def test_clip_token_count_includes_start_and_end_tokens():
    assert count_clip_tokens("") == 2
    assert count_clip_tokens("a cat") == 4


def test_enhance_prompts_records_original_enhanced_method_and_token_counts():
    prompts = pd.DataFrame(
        {
            "prompt_id": ["p1", "p2"],
            "line": [2, 3],
            "prompt": ["a cat", " ".join(["an enormous ornate cathedral"] * 20)],
            "style": ["anime", "none"],
            "negative_prompt": ["", ""],
            "seed": pd.array([1, None], dtype="Int64"),
            "width": pd.array([None, None], dtype="Int64"),
            "height": pd.array([None, None], dtype="Int64"),
            "num_images": [1, 2],
            "backends": [["flux_schnell"], ["sdxl_turbo"]],
        }
    )
    table = enhance_prompts(prompts, TemplateEnhancer())

    assert list(table["original_prompt"]) == list(prompts["prompt"])
    assert table.loc[0, "enhanced_prompt"].startswith("a cat, anime illustration")
    assert list(table["method"]) == ["template", "template"]
    assert not table.loc[0, "clip_truncated"]
    assert table.loc[1, "clip_truncated"] and table.loc[1, "clip_tokens"] > 77
    assert table.loc[1, "t5_tokens_estimate"] < 256
    assert table.loc[0, "prompt_score"] == 70
