"""The open_clip scorer on the tiny random-weight CLIP: formulas, batching, loading, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from imagegen_pipeline.model_weights import ModelWeightsMissingError
from imagegen_pipeline.scoring.clip_scorer import (
    ASPECT_COLUMNS,
    ASPECTS,
    ClipScorer,
    ClipScorerConfig,
    token_count,
)

PROMPTS = ["a cat", "a red dog in the city", "blue sky", "a portrait of a woman", "green light"]


def noise_images(count: int, side: int = 96) -> list[Image.Image]:
    """Noise of several sizes; every other image is bright, which the tiny CLIP likes better."""
    rng = np.random.default_rng(7)
    return [
        Image.fromarray(rng.integers(210 * (i % 2), 256, (side, side + 16 * i, 3), dtype=np.uint8))
        for i in range(count)
    ]


@pytest.fixture
def scorer(tiny_open_clip: Path) -> ClipScorer:
    scorer = ClipScorer(ClipScorerConfig(model=f"local-dir:{tiny_open_clip}", batch_size=5))
    scorer.load()
    return scorer


@pytest.fixture
def reference(tiny_open_clip: Path):
    """The same tiny model loaded by open_clip directly, for hand-computed references."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_open_clip}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{tiny_open_clip}")


def test_clip_score_is_100_cos_clamped_at_zero(scorer, reference):
    model, preprocess, tokenizer = reference
    images = noise_images(5)
    rows = scorer.score_images(images, PROMPTS)
    with torch.no_grad():
        image_features = F.normalize(
            model.encode_image(torch.stack([preprocess(i) for i in images])), dim=-1
        )
        text_features = F.normalize(model.encode_text(tokenizer(PROMPTS)), dim=-1)
    expected = (100 * (image_features * text_features).sum(-1)).clamp(min=0).tolist()
    scores = [row["clip_score"] for row in rows]
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    # Both branches of the clamp are exercised: aligned pairs score, anti-aligned ones get 0.
    assert any(s > 1 for s in scores) and any(s == 0 for s in scores)
    assert all(0 <= s <= 100 for s in scores)


def test_aesthetic_scores_are_softmax_over_positive_and_negative(scorer, reference):
    model, preprocess, tokenizer = reference
    image = noise_images(1)[0]
    (row,) = scorer.score_images([image], ["a cat"])
    with torch.no_grad():
        features = F.normalize(model.encode_image(preprocess(image)[None]), dim=-1)[0]

        def side(texts: tuple[str, ...]) -> torch.Tensor:
            embedded = F.normalize(model.encode_text(tokenizer(list(texts))), dim=-1)
            return F.normalize(embedded.mean(0), dim=-1)

        for column, (positives, negatives) in zip(ASPECT_COLUMNS, ASPECTS.values(), strict=True):
            margin = features @ side(positives) - features @ side(negatives)
            assert row[column] == pytest.approx(float(torch.sigmoid(100 * margin)), abs=1e-4)
    assert set(ASPECT_COLUMNS) == {
        "aesthetic", "aesthetic_composition", "aesthetic_lighting", "aesthetic_colours",
        "aesthetic_sharpness", "aesthetic_style",
    }  # fmt: skip
    assert row["laion_aesthetic"] is None  # no head configured


def test_an_images_scores_do_not_depend_on_its_batch(scorer):
    images = noise_images(5)
    enhanced = [p + ", highly detailed" for p in PROMPTS]
    batched = scorer.score_images(images, PROMPTS, enhanced)
    for index in range(5):
        (alone,) = scorer.score_images([images[index]], [PROMPTS[index]], [enhanced[index]])
        for column, value in alone.items():
            if isinstance(value, float):
                assert value == pytest.approx(batched[index][column], abs=1e-4), column
            else:
                assert value == batched[index][column], column


def test_truncation_uses_the_tokenizers_real_count(scorer):
    short = "a cat on a mat"
    long = ", ".join(["a very detailed photo of a cat"] * 12)
    (row,) = scorer.score_images(noise_images(1), [short], [long])
    assert row["clip_tokens"] == len(scorer.tokenizer.encode(short)) + 2 == 7
    assert row["clip_truncated"] is False
    assert row["clip_tokens_enhanced"] == token_count(scorer.tokenizer, long) > 77
    assert row["clip_truncated_enhanced"] is True
    (missing,) = scorer.score_images(noise_images(1), [short], [None])
    assert missing["clip_score_enhanced"] is None


def test_laion_head_is_a_linear_layer_on_normalised_embeddings(tiny_open_clip, tmp_path, reference):
    model, preprocess, _ = reference
    torch.manual_seed(3)
    head = torch.nn.Linear(32, 1)  # the real one is Linear(768, 1) on ViT-L-14
    torch.save(head.state_dict(), tmp_path / "head.pth")
    save_file(head.state_dict(), tmp_path / "head.safetensors")
    image = noise_images(1)[0]
    with torch.no_grad():
        expected = head(F.normalize(model.encode_image(preprocess(image)[None]), dim=-1)).item()
    for name in ("head.pth", "head.safetensors"):
        config = ClipScorerConfig(
            model=f"local-dir:{tiny_open_clip}", aesthetic_head=str(tmp_path / name)
        )
        (row,) = ClipScorer(config).score_images([image], ["a cat"])
        assert row["laion_aesthetic"] == pytest.approx(expected, abs=1e-5)

    torch.save(torch.nn.Linear(768, 1).state_dict(), tmp_path / "wrong.pth")
    wrong = ClipScorerConfig(
        model=f"local-dir:{tiny_open_clip}", aesthetic_head=str(tmp_path / "wrong.pth")
    )
    with pytest.raises(ValueError, match=r"Linear\(32, 1\)"):
        ClipScorer(wrong).load()


def test_a_model_name_with_a_local_checkpoint_file(tiny_open_clip, tmp_path, scorer):
    config = json.loads((tiny_open_clip / "open_clip_config.json").read_text())
    (tmp_path / "tiny-test-clip.json").write_text(json.dumps(config["model_cfg"]))
    open_clip.add_model_config(tmp_path / "tiny-test-clip.json")
    by_name = ClipScorer(
        ClipScorerConfig(
            model="tiny-test-clip",
            pretrained=None,
            checkpoint=str(tiny_open_clip / "open_clip_model.safetensors"),
        )
    )
    images = noise_images(2)
    expected = scorer.score_images(images, PROMPTS[:2])
    actual = by_name.score_images(images, PROMPTS[:2])
    assert [r["clip_score"] for r in actual] == pytest.approx(
        [r["clip_score"] for r in expected], abs=1e-5
    )
    assert by_name.model_label == "tiny-test-clip"


def test_clip_scores_compare_frames_to_the_source_and_to_each_other(scorer):
    source, other = noise_images(2)
    still = scorer.score_clip(source, [source, source, source])
    assert still["source_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert still["temporal_consistency"] == pytest.approx(1.0, abs=1e-5)
    jumpy = scorer.score_clip(source, [source, other, source])
    assert jumpy["temporal_consistency_min"] < still["temporal_consistency_min"]
    assert jumpy["source_similarity_min"] < 1.0 and jumpy["scored_frames"] == 3


def test_missing_weights_name_what_to_pull(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/clip either
    with pytest.raises(ModelWeightsMissingError) as error:
        ClipScorer(ClipScorerConfig()).load()
    message = str(error.value)
    assert "'ViT-L-14/openai'" in message and "imagegen models pull open_clip" in message
    with pytest.raises(ModelWeightsMissingError, match="nowhere"):
        ClipScorer(ClipScorerConfig(model=f"local-dir:{tmp_path / 'nowhere'}")).load()
    with pytest.raises(ModelWeightsMissingError, match=r"missing\.pt"):
        ClipScorer(ClipScorerConfig(checkpoint=str(tmp_path / "missing.pt"))).load()


def test_unknown_models_and_tags_are_refused():
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ClipScorer(ClipScorerConfig(model="ViT-Z-99")).load()
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        ClipScorer(ClipScorerConfig(pretrained="not-a-tag")).load()
