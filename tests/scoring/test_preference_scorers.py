"""The human-preference scorers on their tiny stand-ins: real layouts, real loading, formulas."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from imagegen_pipeline.model_resolution import resolve_model
from imagegen_pipeline.model_weights import ModelWeightsMissingError
from imagegen_pipeline.project_config import ProjectConfig
from imagegen_pipeline.registry import SCORERS
from imagegen_pipeline.steps.best_of_n import default_scorer_name
from imagegen_pipeline.tiny_models import build_tiny_model
from tests.scoring.samples import assert_sized_before_load, noise, shapes

PROMPTS = ["a red cat", "a dog in the city", "blue sky", "a portrait of a woman"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-scorers")


@pytest.fixture(scope="module")
def scorers(tiny_dir: Path) -> dict:
    """Each scorer resolved the way a step does ("auto" -> the tiny stand-in) and loaded."""
    made = {}
    for name in ("hpsv2", "pickscore"):
        spec = SCORERS[name]
        resolved = resolve_model(spec, "auto", ProjectConfig(models_dir=str(tiny_dir)))
        assert resolved.is_tiny and resolved.model_id == f"tiny-random/{spec.default_model}"
        settings = spec.settings(model=resolved.model, device="cpu", batch_size=3)
        made[name] = spec.implementation_class()(settings, model_id=resolved.model_id)
    return made


def test_the_tiny_hps_is_the_hps_checkpoint_layout_of_vit_h_14(tiny_dir: Path, scorers) -> None:
    folder = build_tiny_model(SCORERS["hpsv2"], tiny_dir)
    checkpoint = torch.load(folder / "HPS_v2.1_compressed.pt", weights_only=True)
    assert set(checkpoint) == {"state_dict"}
    with torch.device("meta"):  # the real ViT-H-14, without allocating its 1B parameters
        real = open_clip.CLIP(**open_clip.get_model_config("ViT-H-14"))
    assert shapes(checkpoint["state_dict"]) == shapes(real.state_dict())


def test_hps_is_the_cosine_of_the_checkpoints_embeddings(tiny_dir: Path, scorers) -> None:
    hps = scorers["hpsv2"]
    images = noise(4)
    scores = hps.score(images, PROMPTS)
    # By hand: the checkpoint's own weights, open_clip's ViT-H-14 preprocessing and tokenizer.
    folder = build_tiny_model(SCORERS["hpsv2"], tiny_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    state = torch.load(folder / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    with torch.no_grad():
        image = F.normalize(
            model.encode_image(torch.stack([preprocess(i) for i in images])), dim=-1
        )
        text = F.normalize(model.encode_text(open_clip.get_tokenizer("ViT-H-14")(PROMPTS)), dim=-1)
    assert scores == pytest.approx((image * text).sum(-1).tolist(), abs=1e-5)
    # One image's score never depends on its batch.
    assert [hps.score([i], [p])[0] for i, p in zip(images, PROMPTS, strict=True)] == pytest.approx(
        scores, abs=1e-5
    )
    assert hps.model_loads == 1 and hps.model_revision == "main"


def test_the_tiny_pickscore_is_a_clip_model_with_the_laion_processor(
    tiny_dir: Path, scorers
) -> None:
    from transformers import CLIPConfig, CLIPModel

    folder = build_tiny_model(SCORERS["pickscore"], tiny_dir)
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "vocab.json"} <= names
    config = CLIPConfig.from_pretrained(folder)
    assert config.vision_config.patch_size == 14 and config.vision_config.image_size == 224
    with torch.device("meta"):
        real = CLIPModel(CLIPConfig(vision_config={"patch_size": 14}))
    pick = scorers["pickscore"]
    pick.load()
    assert shapes(pick.model.state_dict()) == shapes(real.state_dict())


def test_pickscore_is_the_scaled_cosine_of_the_model_card(scorers) -> None:
    pick = scorers["pickscore"]
    images = noise(4)
    scores = pick.score(images, PROMPTS)
    model, processor = pick.model, pick.processor
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")
        text = processor(text=PROMPTS, padding=True, truncation=True, max_length=77,
                         return_tensors="pt")  # fmt: skip
        image = model.get_image_features(**pixels)
        words = model.get_text_features(**text)
        image = F.normalize(getattr(image, "pooler_output", image), dim=-1)
        words = F.normalize(getattr(words, "pooler_output", words), dim=-1)
        expected = (model.logit_scale.exp() * (image * words).sum(-1)).tolist()
    assert scores == pytest.approx(expected, abs=1e-4)
    assert pick.score(images[1:2], PROMPTS[1:2]) == pytest.approx(scores[1:2], abs=1e-4)


@pytest.mark.parametrize("name", ["hpsv2", "pickscore", "imagereward"])
def test_missing_real_weights_say_how_to_get_them(name: str) -> None:
    spec = SCORERS[name]
    scorer = spec.implementation_class()(spec.settings(model=spec.default_model, device="cpu"))
    with pytest.raises(ModelWeightsMissingError, match="imagegen models pull"):
        scorer.load()


def test_the_default_scorer_is_hps_only_with_its_weights(tmp_path: Path) -> None:
    # No real HPS weights here: ranking by a random-weight HPS would rank by noise.
    assert default_scorer_name(ProjectConfig()) == "clip"
    assert default_scorer_name(ProjectConfig(models={"hpsv2": str(tmp_path)})) == "hpsv2"


@pytest.mark.parametrize("name", ["hpsv2", "pickscore"])
def test_a_scorers_weights_are_sized_before_it_loads(name: str, scorers) -> None:
    loaded = scorers[name]
    planned = assert_sized_before_load(loaded)
    half = type(loaded)(loaded.config.model_copy(update={"precision": "fp16"}))
    assert half.planned_weight_bytes() * 2 == planned
