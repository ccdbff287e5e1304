"""VQAScore (CLIP-FlanT5) on its tiny stand-in: the real checkpoint's layout, strict loading,
and the score recomputed the way t2v_metrics' clip_t5_model.py computes it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    T5Config,
    T5ForConditionalGeneration,
)

from imagegen_pipeline.model_resolution import resolve_model
from imagegen_pipeline.model_weights import ModelWeightsMissingError
from imagegen_pipeline.project_config import ProjectConfig
from imagegen_pipeline.registry import SCORERS
from imagegen_pipeline.scoring.vqascore import VqaScoreScorer, VqaScoreSettings
from imagegen_pipeline.tiny_models import build_tiny_model
from tests.scoring.samples import assert_sized_before_load
from tests.scoring.test_preference_scorers import PROMPTS, noise, shapes

SPEC = SCORERS["vqascore"]
# Retyped from t2v_metrics (constants.py, clip_t5_model.py), not taken from the module tested.
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_TOKEN_INDEX, IGNORE_INDEX = -200, -100


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-vqascore")


@pytest.fixture(scope="module")
def folder(root: Path) -> Path:
    return build_tiny_model(SPEC, root)


@pytest.fixture(scope="module")
def scorer(root: Path, folder: Path) -> VqaScoreScorer:
    """Resolved the way a step does ("auto" -> the tiny stand-in) and loaded."""
    resolved = resolve_model(SPEC, "auto", ProjectConfig(models_dir=str(root)))
    assert resolved.is_tiny and resolved.model_id == "tiny-random/zhiqiulin/clip-flant5-xl"
    settings = SPEC.settings(model=resolved.model, device="cpu", batch_size=3)
    made = SPEC.implementation_class()(settings, model_id=resolved.model_id)
    made.load()
    return made


def checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "pytorch_model.bin", weights_only=True)


class CLIPVisionTower(nn.Module):
    """t2v_metrics' CLIPVisionTower as far as the state dict sees it: the CLIPVisionModel as
    `.vision_tower`."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.vision_tower = CLIPVisionModel(config)


def test_the_tiny_checkpoint_has_the_key_layout_of_the_real_clip_flant5_xl(folder: Path) -> None:
    # The real model, built on the meta device from the published configs: google/flan-t5-xl
    # (which clip-flant5-xl's config.json keeps) and openai/clip-vit-large-patch14-336's
    # vision_config. Its keys follow CLIPT5ForConditionalGeneration's attributes as written in
    # t2v_metrics' clip_t5.py (retyped here, not read from vqascore.py): the T5 itself,
    # `self.embed_tokens = self.encoder.embed_tokens`, `self.vision_tower` (a CLIPVisionTower
    # holding the CLIPVisionModel, whose transformers-4 keys, as saved in 2023, start with
    # `vision_model.`), `self.mm_projector` (mlp2x_gelu). Not circular: the tiny file is
    # written from the adapter's own key prefixes, and must match this independent tree at
    # another depth.
    flan_t5_xl = T5Config(
        d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24, vocab_size=32128,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
    )  # fmt: skip
    vit_l_14_336 = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14,
    )  # fmt: skip
    with torch.device("meta"):
        t5 = T5ForConditionalGeneration(flan_t5_xl)
        tower = CLIPVisionTower(vit_l_14_336)
        projector = nn.Sequential(nn.Linear(1024, 2048), nn.GELU(), nn.Linear(2048, 2048))
    real = {**t5.state_dict(), "embed_tokens.weight": t5.shared.weight}
    for key, value in tower.state_dict().items():  # "vision_tower.<CLIPVisionModel key>"
        attribute, rest = key.split(".", 1)
        real[f"vision_tower.{attribute}.vision_model.{rest}"] = value
    real |= {f"mm_projector.{k}": v for k, v in projector.state_dict().items()}
    state = checkpoint(folder)
    assert shapes(state) == shapes(real)
    # The published file is 6.32 GB of bf16: T5 with its own lm_head, the whole vision tower
    # and the projector, the token embedding stored once (without the tower: 5.7 GB).
    aliases = {"embed_tokens.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    elements = sum(v.numel() for k, v in real.items() if k not in aliases)
    assert 2 * elements == pytest.approx(6.32e9, rel=2e-3)
    # Like the real pickle: bf16 only, and the embedding's aliases share one storage.
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    pointers = {state[k].untyped_storage().data_ptr() for k in ["shared.weight", *aliases]}
    assert len(pointers) == 1
    assert not torch.equal(state["lm_head.weight"], state["shared.weight"])


def test_the_tiny_config_has_the_keys_the_source_reads(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "clip_t5"
    assert config["architectures"] == ["CLIPT5ForConditionalGeneration"]
    assert config["mm_vision_tower"] == "openai/clip-vit-large-patch14-336"
    assert config["mm_projector_type"] == "mlp2x_gelu"
    assert (config["mm_vision_select_layer"], config["mm_vision_select_feature"]) == (-2, "patch")
    assert config["tie_word_embeddings"] is False  # Flan-T5
    vision = CLIPVisionConfig.from_pretrained(folder / "clip-vit-large-patch14-336")
    assert config["mm_hidden_size"] == vision.hidden_size
    assert (vision.image_size, vision.patch_size) == (336, 14)
    # The real repos' 28 embedding rows past the tokenizer (32128 vs 32100) are mirrored.
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert config["vocab_size"] == len(tokenizer) + 28
    assert tokenizer.convert_ids_to_tokens(tokenizer("Yes").input_ids) == ["▁Yes", "</s>"]


def test_loading_is_strict(folder: Path, tmp_path: Path, scorer: VqaScoreScorer) -> None:
    t5 = scorer.model["t5"]
    state = checkpoint(folder)
    assert torch.equal(t5.lm_head.weight, state["lm_head.weight"].float())
    assert t5.encoder.embed_tokens.weight is t5.shared.weight is t5.decoder.embed_tokens.weight
    assert torch.equal(
        scorer.model["mm_projector"][2].weight, state["mm_projector.2.weight"].float()
    )

    def load_with(change: dict) -> VqaScoreScorer:
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(folder, copy)
        changed = {k: v for k, v in state.items() if k not in change} | {
            k: v for k, v in change.items() if v is not None
        }
        torch.save(changed, copy / "pytorch_model.bin")
        made = VqaScoreScorer(VqaScoreSettings(model=str(copy), device="cpu"))
        made.load()
        return made

    with pytest.raises(ValueError, match="unexpected"):
        load_with({"lm_head.bias": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_with({"mm_projector.4.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="missing"):
        load_with({"decoder.final_layer_norm.weight": None})
    with pytest.raises(RuntimeError, match="Missing key"):
        load_with({"vision_tower.vision_tower.vision_model.post_layernorm.bias": None})
    with pytest.raises(ValueError, match="differs"):
        load_with({"embed_tokens.weight": torch.zeros_like(state["shared.weight"])})
    # The one explicit exception: a constant buffer transformers 4 may have saved.
    position_ids = "vision_tower.vision_tower.vision_model.embeddings.position_ids"
    load_with({position_ids: torch.arange(577)[None]})


def source_scores(folder: Path, images: list[Image.Image], prompts: list[str]) -> list[float]:
    """t2v_metrics' CLIPT5Model.forward, step by step, on weights loaded by transformers'
    own from_pretrained (T5) and plain load_state_dict (tower, projector)."""
    state = checkpoint(folder)
    t5 = T5ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    vision_dir = folder / "clip-vit-large-patch14-336"
    tower = CLIPVisionModel(CLIPVisionConfig.from_pretrained(vision_dir)).eval()
    prefix = "vision_tower.vision_tower.vision_model."
    tower.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    projector = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))
    projector.load_state_dict({k[13:]: v for k, v in state.items() if k.startswith("mm_proj")})
    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = CLIPImageProcessorPil.from_pretrained(vision_dir)

    def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
        width, height = image.size
        side = max(width, height)
        result = Image.new(image.mode, (side, side), background)
        result.paste(image, ((side - width) // 2, (side - height) // 2))
        return result

    def t5_tokenizer_image_token(text: str) -> torch.Tensor:
        chunks = [tokenizer(chunk).input_ids for chunk in text.split("<image>")]
        ids = chunks[0]
        for chunk in chunks[1:]:
            ids = [*ids, IMAGE_TOKEN_INDEX, *chunk]
        return torch.tensor(ids)

    questions = [f'Does this figure show "{p}"? Please answer yes or no.' for p in prompts]
    questions = [f"{SYSTEM} USER: <image>\n{q} ASSISTANT: " for q in questions]
    pad = tokenizer.pad_token_id
    input_ids = [t5_tokenizer_image_token(q) for q in questions]
    input_ids = nn.utils.rnn.pad_sequence(input_ids, batch_first=True, padding_value=pad)
    labels = nn.utils.rnn.pad_sequence(
        [t5_tokenizer_image_token("Yes") for _ in prompts],
        batch_first=True,
        padding_value=IGNORE_INDEX,
    )
    attention_mask = input_ids.ne(pad)
    background = tuple(int(x * 255) for x in processor.image_mean)
    pixels = torch.stack(
        [
            processor.preprocess(expand2square(image, background), return_tensors="pt")[
                "pixel_values"
            ][0]
            for image in images
        ]
    )
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        image_features = projector(hidden)
        embed = t5.get_input_embeddings()
        rows = []
        for ids, features in zip(input_ids, image_features, strict=True):
            at = int(torch.where(ids == IMAGE_TOKEN_INDEX)[0][0])
            rows.append(torch.cat([embed(ids[:at]), features, embed(ids[at + 1 :])]))
        inputs_embeds = torch.stack(rows)
        left = torch.ones(len(rows), inputs_embeds.shape[1] - input_ids.shape[1], dtype=torch.bool)
        attention_mask = torch.cat([left, attention_mask], dim=1)
        logits = t5(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels
        ).logits
        # load_pretrained_model's resize_token_embeddings(len(tokenizer)) cuts lm_head to it.
        logits = logits[..., : len(tokenizer)]
        loss = nn.CrossEntropyLoss(reduction="mean")
        return [math.exp(-loss(logits[k], labels[k]).item()) for k in range(len(prompts))]


def test_the_score_is_the_sources_yes_probability(folder: Path, scorer: VqaScoreScorer) -> None:
    images = noise(4)
    scores = scorer.score(images, PROMPTS)
    assert scores == pytest.approx(source_scores(folder, images, PROMPTS), rel=1e-5)
    assert all(0.0 < score < 1.0 for score in scores)
    # Another image, another prompt: another score.
    by_image = scorer.score(images, [PROMPTS[0]] * 4)
    by_prompt = scorer.score([images[0]] * 4, PROMPTS)
    for row in (by_image, by_prompt):
        assert min(abs(a - b) for i, a in enumerate(row) for b in row[i + 1 :]) > 1e-7
    # One pair's score never depends on its batch (batch_size 3 above, 1 and 4 here).
    one_by_one = [scorer.score([i], [p])[0] for i, p in zip(images, PROMPTS, strict=True)]
    assert one_by_one == pytest.approx(scores, rel=1e-5)
    everything = VqaScoreScorer(
        VqaScoreSettings(model=scorer.config.model, device="cpu", batch_size=4)
    )
    assert everything.score(images, PROMPTS) == pytest.approx(scores, rel=1e-5)
    assert scorer.model_loads == 1 and scorer.model_revision == "main"


def test_other_weight_layouts_give_the_same_scores(
    folder: Path, tmp_path: Path, scorer: VqaScoreScorer
) -> None:
    from safetensors.torch import save_file

    images, state = noise(2), checkpoint(folder)
    expected = scorer.score(images, PROMPTS[:2])
    # Sharded pickles with their index (as larger repos are saved), and one safetensors file
    # keeping a single name of the shared embedding (as a conversion does).
    sharded = tmp_path / "sharded"
    shutil.copytree(folder, sharded)
    (sharded / "pytorch_model.bin").unlink()
    keys = list(state)
    shards = {
        "pytorch_model-00001-of-00002.bin": keys[:40],
        "pytorch_model-00002-of-00002.bin": keys[40:],
    }
    for name, names in shards.items():
        torch.save({k: state[k] for k in names}, sharded / name)
    weight_map = {k: name for name, names in shards.items() for k in names}
    index = {"metadata": {}, "weight_map": weight_map}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    converted = tmp_path / "converted"
    shutil.copytree(folder, converted)
    (converted / "pytorch_model.bin").unlink()
    aliases = {"shared.weight", "embed_tokens.weight", "encoder.embed_tokens.weight"}
    single = {k: v.clone() for k, v in state.items() if k not in aliases}
    save_file(single, converted / "model.safetensors")
    for variant in (sharded, converted):
        other = VqaScoreScorer(VqaScoreSettings(model=str(variant), device="cpu"))
        assert other.score(images, PROMPTS[:2]) == pytest.approx(expected, rel=1e-6)


def test_missing_weights_say_how_to_get_them(folder: Path, tmp_path: Path) -> None:
    real = VqaScoreScorer(VqaScoreSettings(model=SPEC.default_model, device="cpu"))
    with pytest.raises(ModelWeightsMissingError, match="imagegen models pull"):
        real.load()
    gone = VqaScoreScorer(VqaScoreSettings(model=str(tmp_path / "nowhere"), device="cpu"))
    with pytest.raises(ModelWeightsMissingError, match="missing or incomplete"):
        gone.load()
    # Without its vision tower's files beside it, a local model looks for them in the cache.
    alone = tmp_path / "alone"
    shutil.copytree(folder, alone, ignore=shutil.ignore_patterns("clip-vit-*"))
    blind = VqaScoreScorer(VqaScoreSettings(model=str(alone), device="cpu"))
    with pytest.raises(ModelWeightsMissingError, match="openai/clip-vit-large-patch14-336"):
        blind.load()


def test_fp16_is_refused() -> None:
    with pytest.raises(ValueError, match="fp16"):
        VqaScoreScorer(VqaScoreSettings(precision="fp16"))


def test_the_weights_are_sized_before_the_model_loads(scorer) -> None:
    assert_sized_before_load(scorer)
