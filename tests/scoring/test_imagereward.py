"""ImageReward on transformers: the real checkpoint's layout, strict loading, the original score."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from torchvision.transforms import (
    CenterCrop,
    Compose,
    InterpolationMode,
    Normalize,
    Resize,
    ToTensor,
)
from transformers import BertTokenizer, BlipTextModel, BlipVisionModel

from imagegen_pipeline.model_resolution import resolve_model
from imagegen_pipeline.model_weights import ModelWeightsMissingError
from imagegen_pipeline.project_config import ProjectConfig
from imagegen_pipeline.registry import SCORERS
from imagegen_pipeline.scoring.imagereward import ImageRewardScorer
from imagegen_pipeline.scoring.imagereward_checkpoint import (
    IGNORED_KEYS,
    REAL_MED,
    blip_configs,
    reward_head,
    split_checkpoint,
)
from imagegen_pipeline.tiny_models import build_tiny_model
from tests.scoring.original_imagereward import OriginalImageReward
from tests.scoring.samples import assert_sized_before_load, noise, shapes

SPEC = SCORERS["imagereward"]
# create_vit("large") at ImageReward's 224 px; the tiny one is 2 blocks of width 128 (2 heads).
VIT_L = {"width": 1024, "depth": 24, "heads": 16, "patch": 16, "image": 224}
TINY_VIT = {"width": 128, "depth": 2, "heads": 2, "patch": 16, "image": 224}
PROMPTS = ["a red cat", "a dog in the city", "blue sky", "a portrait of a woman",
           "a detailed cinematic landscape painting of a city street in the light of the sun "
           "with a black dog, a white cat and a man in a red coat, high quality"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-imagereward")


@pytest.fixture(scope="module")
def folder(tiny_dir: Path) -> Path:
    return build_tiny_model(SPEC, tiny_dir)


@pytest.fixture(scope="module")
def scorer(tiny_dir: Path) -> ImageRewardScorer:
    """Resolved the way a step does ("auto" -> the tiny stand-in), batches of 3."""
    resolved = resolve_model(SPEC, "auto", ProjectConfig(models_dir=str(tiny_dir)))
    assert resolved.is_tiny and resolved.model_id == "tiny-random/THUDM/ImageReward"
    settings = SPEC.settings(model=resolved.model, device="cpu", batch_size=3)
    return SPEC.implementation_class()(settings, model_id=resolved.model_id)


def test_the_tiny_checkpoint_has_the_layout_of_the_real_one(folder: Path) -> None:
    names = {path.name for path in folder.iterdir()}
    # THUDM/ImageReward's two files, bert-base-uncased's tokenizer files beside them.
    assert {"ImageReward.pt", "med_config.json"} <= names
    assert {"vocab.txt", "tokenizer.json", "tokenizer_config.json"} <= names
    tiny = torch.load(folder / "ImageReward.pt", weights_only=True)
    with torch.device("meta"):  # the real ImageReward module, without its 447M parameters
        real = OriginalImageReward(REAL_MED, VIT_L).state_dict()
    assert shapes(tiny) == shapes(real)
    assert set(real) > IGNORED_KEYS  # what the adapter skips is in the real layout
    # At its own size the original module takes every tensor, shapes included.
    med = json.loads((folder / "med_config.json").read_text())
    assert med["encoder_width"] == 768 and med["add_cross_attention"]  # as the real file
    OriginalImageReward(med, TINY_VIT).load_state_dict(tiny, strict=True)


def test_the_real_checkpoint_converts_to_transformers_strictly() -> None:
    with torch.device("meta"):
        real = OriginalImageReward(REAL_MED, VIT_L).state_dict()
    vision_config, text_config = blip_configs(real, REAL_MED)
    assert (
        vision_config.hidden_size,
        vision_config.num_hidden_layers,
        vision_config.num_attention_heads,
        vision_config.intermediate_size,
        vision_config.image_size,
        vision_config.patch_size,
        vision_config.layer_norm_eps,
    ) == (1024, 24, 16, 4096, 224, 16, 1e-6)
    assert (text_config.encoder_hidden_size, text_config.vocab_size) == (1024, 30524)
    vision_state, text_state, mlp_state = split_checkpoint(real)
    with torch.device("meta"):
        vision = BlipVisionModel(vision_config)
        text = BlipTextModel(text_config, add_pooling_layer=False)
        head = reward_head(mlp_state)
    for module, part in ((vision, vision_state), (text, text_state), (head, mlp_state)):
        module.load_state_dict(part, strict=True, assign=True)  # every name and every shape
    used = len(vision_state) + len(text_state) + len(mlp_state)
    assert used + len(IGNORED_KEYS) == len(real)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"add": "blip.itm_head.weight"}, "has keys ImageReward does not: blip.itm_head"),
        ({"add": "blip.visual_encoder.head.weight"}, "has keys ImageReward does not"),
        ({"add": "blip.text_encoder.pooler.dense.weight"}, "Unexpected key"),
        ({"drop": "blip.text_encoder.encoder.layer.1.crossattention.self.key.bias"}, "Missing"),
        ({"drop": "mlp.layers.7.bias"}, "Missing"),
        ({"drop": "mlp.layers.6.weight"}, "has no mlp.layers.6.weight"),
    ],
)
def test_loading_is_strict(folder: Path, tmp_path: Path, change: dict, error: str) -> None:
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    state = torch.load(copy / "ImageReward.pt", weights_only=True)
    if "add" in change:
        state[change["add"]] = torch.zeros(2, 32)
    else:
        del state[change["drop"]]
    torch.save(state, copy / "ImageReward.pt")
    scorer = ImageRewardScorer(SPEC.settings(model=str(copy), device="cpu"))
    with pytest.raises((ValueError, RuntimeError), match=error):
        scorer.load()


def test_imagereward_is_the_original_score(folder: Path, scorer: ImageRewardScorer) -> None:
    images = noise(len(PROMPTS))
    scores = scorer.score(images, PROMPTS)
    # The original network on the same checkpoint, with ImageReward's own preprocessing
    # (_transform(224)) and BLIP's init_tokenizer(), written out here.
    original = OriginalImageReward(json.loads((folder / "med_config.json").read_text()), TINY_VIT)
    original.load_state_dict(torch.load(folder / "ImageReward.pt", weights_only=True))
    transform = Compose([
        Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224),
        lambda image: image.convert("RGB"), ToTensor(),
        Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])  # fmt: skip
    tokenizer = BertTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35,
                       return_tensors="pt")  # fmt: skip
    assert int(tokens.attention_mask.sum(-1).max()) == 35 > int(tokens.attention_mask.sum(-1).min())
    pixels = torch.stack([transform(image) for image in images])
    with torch.no_grad():
        expected = original.eval().score(pixels, tokens.input_ids, tokens.attention_mask)
    # 1e-6 apart in float32; the tanh GELU instead of the exact one would be 6e-5 apart.
    assert scores == pytest.approx(expected.tolist(), abs=1e-5)
    # score()'s formula on the adapter's own modules: the [CLS] state, the mean and the std.
    model = scorer.model
    with torch.no_grad():
        image_embeds = model["vision"](pixel_values=pixels).last_hidden_state
        text = model["text"](
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long),
        )
        reward = model["mlp"](text.last_hidden_state[:, 0, :]).squeeze(-1)
    expected = (reward - 0.16717362830052426) / 1.0333394966054072
    assert scores == pytest.approx(expected.tolist(), abs=1e-5)
    # One pair's score never depends on its batch; scores follow both the image and the prompt.
    pairs = zip(images, PROMPTS, strict=True)
    singles = [scorer.score([image], [prompt])[0] for image, prompt in pairs]
    assert singles == pytest.approx(scores, abs=1e-5)
    by_image = scorer.score(images, [PROMPTS[0]] * len(images))
    by_prompt = scorer.score([images[0]] * len(PROMPTS), PROMPTS)
    for varied in (by_image, by_prompt):
        assert min(np.diff(sorted(varied))) > 1e-3
    assert scorer.model_loads == 1 and scorer.model_revision == "main"
    assert scorer.model_label == "tiny-random/THUDM/ImageReward"


@pytest.mark.parametrize("where", ["empty", "absent"])
def test_a_folder_without_the_model_files_says_so(tmp_path: Path, where: str) -> None:
    folder = tmp_path if where == "empty" else tmp_path / "absent"
    scorer = ImageRewardScorer(SPEC.settings(model=str(folder), device="cpu"))
    with pytest.raises(
        ModelWeightsMissingError, match=r"needs ImageReward\.pt and med_config\.json"
    ):
        scorer.load()


def test_a_missing_tokenizer_says_how_to_get_it(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # transformers' BertTokenizer alone would fall back to a 5-token vocabulary here.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    settings = SPEC.settings(model=str(folder), tokenizer="bert-base-uncased", device="cpu")
    with pytest.raises(ModelWeightsMissingError, match="imagegen models pull imagereward"):
        ImageRewardScorer(settings).load()
    empty = tmp_path / "tokenizer"
    empty.mkdir()
    settings = SPEC.settings(model=str(folder), tokenizer=str(empty), device="cpu")
    with pytest.raises(ModelWeightsMissingError, match=r"needs vocab\.txt"):
        ImageRewardScorer(settings).load()


def test_the_pulled_files_load_from_the_hub_cache(
    folder: Path, scorer: ImageRewardScorer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What `imagegen models pull imagereward` leaves in the cache (the tiny files standing in),
    # read offline with the default model and tokenizer.
    commit = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    for source in (SPEC.weights, *SPEC.weights.companions):
        repo = tmp_path / f"models--{source.repo_id.replace('/', '--')}"
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        for name in source.allow_patterns:
            shutil.copy(folder / name, repo / "snapshots" / commit / name)
    resolved = resolve_model(SPEC, "auto", ProjectConfig(models_dir=str(tmp_path / "tiny")))
    assert not resolved.is_tiny and resolved.model == "THUDM/ImageReward"
    cached = ImageRewardScorer(SPEC.settings(model=resolved.model, device="cpu"))
    images = noise(2)
    assert cached.score(images, PROMPTS[:2]) == pytest.approx(
        scorer.score(images, PROMPTS[:2]), abs=1e-5
    )


def test_the_weights_are_sized_before_the_model_loads(scorer) -> None:
    assert_sized_before_load(scorer)
