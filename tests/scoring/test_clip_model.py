"""The open_clip model on the tiny random-weight CLIP: formulas, batching, loading, errors."""

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

from imagegen_pipeline.model_resolution import resolve_settings
from imagegen_pipeline.model_weights import ModelWeightsMissingError
from imagegen_pipeline.project_config import ProjectConfig
from imagegen_pipeline.registry import CLIP_MODEL
from imagegen_pipeline.scoring.clip_model import (
    ASPECT_COLUMNS,
    ASPECTS,
    ClipModel,
    ClipModelSettings,
    token_count,
)

PROMPTS = ["a cat", "a red dog in the city", "blue sky", "a portrait of a woman", "green light"]
VIT_L_14 = "ViT-L-14"  # the real model's open_clip name (CLIPScore and the LAION head use it)


def noise_images(count: int, side: int = 96) -> list[Image.Image]:
    """Noise of several sizes; every other image is bright, which the tiny CLIP likes better."""
    rng = np.random.default_rng(7)
    return [
        Image.fromarray(rng.integers(210 * (i % 2), 256, (side, side + 16 * i, 3), dtype=np.uint8))
        for i in range(count)
    ]


def tiny_settings(tiny_open_clip: Path, **settings) -> ClipModelSettings:
    return ClipModelSettings(model=f"local-dir:{tiny_open_clip}", device="cpu", **settings)


@pytest.fixture
def clip_model(tiny_open_clip: Path) -> ClipModel:
    model = ClipModel(tiny_settings(tiny_open_clip, batch_size=5))
    model.load()
    return model


@pytest.fixture
def reference(tiny_open_clip: Path):
    """The same tiny model loaded by open_clip directly, for hand-computed references."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_open_clip}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{tiny_open_clip}")


def test_clip_score_is_100_cos_clamped_at_zero(clip_model, reference):
    model, preprocess, tokenizer = reference
    images = noise_images(5)
    rows = clip_model.score_images(images, PROMPTS)
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


def test_aesthetic_scores_are_softmax_over_positive_and_negative(clip_model, reference):
    model, preprocess, tokenizer = reference
    image = noise_images(1)[0]
    (row,) = clip_model.score_images([image], ["a cat"])
    with torch.no_grad():
        features = F.normalize(model.encode_image(preprocess(image)[None]), dim=-1)[0]

        def side(texts: tuple[str, ...]) -> torch.Tensor:
            embedded = F.normalize(model.encode_text(tokenizer(list(texts))), dim=-1)
            return F.normalize(embedded.mean(0), dim=-1)

        for column, (positives, negatives) in zip(ASPECT_COLUMNS, ASPECTS.values(), strict=True):
            margin = features @ side(positives) - features @ side(negatives)
            assert row[column] == pytest.approx(float(torch.sigmoid(100 * margin)), abs=1e-4)
    assert set(ASPECT_COLUMNS) == {
        "aesthetic",
        "aesthetic_composition",
        "aesthetic_lighting",
        "aesthetic_colours",
        "aesthetic_sharpness",
        "aesthetic_style",
    }
    assert row["laion_aesthetic"] is None  # no head configured


def test_an_images_scores_do_not_depend_on_its_batch(clip_model):
    images = noise_images(5)
    enhanced = [p + ", highly detailed" for p in PROMPTS]
    batched = clip_model.score_images(images, PROMPTS, enhanced)
    for index in range(5):
        (alone,) = clip_model.score_images([images[index]], [PROMPTS[index]], [enhanced[index]])
        for column, value in alone.items():
            if isinstance(value, float):
                assert value == pytest.approx(batched[index][column], abs=1e-4), column
            else:
                assert value == batched[index][column], column


def test_truncation_uses_the_tokenizers_real_count(clip_model):
    short = "a cat on a mat"
    long = ", ".join(["a very detailed photo of a cat"] * 12)
    (row,) = clip_model.score_images(noise_images(1), [short], [long])
    assert row["clip_tokens"] == len(clip_model.tokenizer.encode(short)) + 2 == 7
    assert row["clip_truncated"] is False
    assert row["clip_tokens_enhanced"] == token_count(clip_model.tokenizer, long) > 77
    assert row["clip_truncated_enhanced"] is True
    (missing,) = clip_model.score_images(noise_images(1), [short], [None])
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
        settings = tiny_settings(tiny_open_clip, aesthetic_head=str(tmp_path / name))
        (row,) = ClipModel(settings).score_images([image], ["a cat"])
        assert row["laion_aesthetic"] == pytest.approx(expected, abs=1e-5)

    torch.save(torch.nn.Linear(768, 1).state_dict(), tmp_path / "wrong.pth")
    wrong = tiny_settings(tiny_open_clip, aesthetic_head=str(tmp_path / "wrong.pth"))
    with pytest.raises(ValueError, match=r"Linear\(32, 1\)"):
        ClipModel(wrong).load()


def test_a_model_name_with_a_local_checkpoint_file(tiny_open_clip, tmp_path, clip_model):
    config = json.loads((tiny_open_clip / "open_clip_config.json").read_text())
    (tmp_path / "tiny-test-clip.json").write_text(json.dumps(config["model_cfg"]))
    open_clip.add_model_config(tmp_path / "tiny-test-clip.json")
    by_name = ClipModel(
        ClipModelSettings(
            model="tiny-test-clip",
            pretrained=None,
            checkpoint=str(tiny_open_clip / "open_clip_model.safetensors"),
            device="cpu",
        )
    )
    images = noise_images(2)
    expected = clip_model.score_images(images, PROMPTS[:2])
    actual = by_name.score_images(images, PROMPTS[:2])
    assert [r["clip_score"] for r in actual] == pytest.approx(
        [r["clip_score"] for r in expected], abs=1e-5
    )
    assert by_name.model_label == "tiny-test-clip"


def test_model_labels_name_what_scored(tiny_open_clip):
    assert ClipModel(ClipModelSettings(model=VIT_L_14)).model_label == "ViT-L-14/openai"
    folder = f"local-dir:{tiny_open_clip}"
    assert ClipModel(tiny_settings(tiny_open_clip)).model_label == folder
    # A model resolved for this machine records the id it stands for, not where it was built.
    assert ClipModel(tiny_settings(tiny_open_clip), model_id="tiny/x").model_label == "tiny/x"
    # resolve_settings gives a tiny folder the prefix open_clip needs to load it.
    resolved, model = resolve_settings(
        CLIP_MODEL, ClipModelSettings(model=str(tiny_open_clip)), ProjectConfig(device="cpu")
    )
    assert resolved.model == folder and model is not None and model.is_tiny
    assert resolved.device == "cpu"


def test_video_clip_scores_compare_frames_to_the_source_and_to_each_other(clip_model):
    source, other = noise_images(2)
    still = clip_model.score_video_clip(source, [source, source, source])
    assert still["source_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert still["temporal_consistency"] == pytest.approx(1.0, abs=1e-5)
    jumpy = clip_model.score_video_clip(source, [source, other, source])
    assert jumpy["temporal_consistency_min"] < still["temporal_consistency_min"]
    assert jumpy["source_similarity_min"] < 1.0 and jumpy["scored_frames"] == 3
    with pytest.raises(ValueError, match="without frames"):
        clip_model.score_video_clip(source, [])


def test_missing_weights_name_what_to_pull(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/clip either
    with pytest.raises(ModelWeightsMissingError) as error:
        ClipModel(ClipModelSettings(model=VIT_L_14, device="cpu")).load()
    message = str(error.value)
    assert "'ViT-L-14/openai'" in message and "imagegen models pull clip_model" in message
    with pytest.raises(ModelWeightsMissingError, match="nowhere"):
        ClipModel(ClipModelSettings(model=f"local-dir:{tmp_path / 'nowhere'}")).load()
    with pytest.raises(ModelWeightsMissingError, match=r"missing\.pt"):
        settings = ClipModelSettings(model=VIT_L_14, checkpoint=str(tmp_path / "missing.pt"))
        ClipModel(settings).load()


def test_unknown_models_and_tags_are_refused():
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ClipModel(ClipModelSettings(model="ViT-Z-99", device="cpu")).load()
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        ClipModel(ClipModelSettings(model=VIT_L_14, pretrained="not-a-tag", device="cpu")).load()
    with pytest.raises(ValueError, match="batch_size"):
        ClipModel(ClipModelSettings(model=VIT_L_14, batch_size=0))
