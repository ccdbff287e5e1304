"""VQAScore with CLIP-FlanT5 (Lin et al., ECCV 2024): how likely a VQA model answers "Yes".

Built on transformers 5 without the ``t2v-metrics`` package (its pins conflict with the
project's), after its ``models/vqascore_models/clip_t5_model.py`` and ``clip_t5/`` (last in
v3.0; v3.1 dropped CLIP-FlanT5). ``CLIPT5ForConditionalGeneration`` is LLaVA-style: a Flan-T5
``T5ForConditionalGeneration`` with a CLIP ViT-L/14-336 ``vision_tower`` and an
``mm_projector`` (``mlp2x_gelu``: Linear, GELU, Linear) turning the patch features of the
tower's second-to-last layer (CLS dropped: 576 tokens) into T5 input embeddings, spliced where
``<image>`` stands in the encoder input ``<system message> USER: <image>\\nDoes this figure
show "<prompt>"? Please answer yes or no. ASSISTANT:``, each side of ``<image>`` tokenized on
its own (so each ends with ``</s>``). The image is padded to a square of the processor's mean
colour, then CLIP-preprocessed (336 px). The score is ``exp(-mean cross-entropy)`` of the
answer's tokens ``["▁Yes", "</s>"]``: the geometric mean of P("Yes") and P("</s>" | "Yes"),
in [0, 1], higher preferred, over the tokenizer's 32100 ids (the source resizes the 32128-row
embeddings to them).

Hub repos (``main``): ``config.json``, one bf16 ``pytorch_model.bin`` (6.3 GB for xl: T5,
vision tower and projector), a copy of the Flan-T5 tokenizer (the source loads the same files
from google/flan-t5-xl), training leftovers. Of ``mm_vision_tower``
(openai/clip-vit-large-patch14-336) only the architecture and image processor are read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import Field

from imagegen_pipeline.model_settings import LOCAL_DIR
from imagegen_pipeline.model_spec import ModelSpec, WeightSource
from imagegen_pipeline.model_weights import ModelWeightsMissingError, missing_weights_message
from imagegen_pipeline.scoring.preference import (
    TORCH_DTYPES,
    LoadedScorer,
    PreferenceScorerSettings,
)
from imagegen_pipeline.scoring.vqascore_checkpoint import (
    EMBEDDING_NAMES,
    PROJECTOR_PREFIX,
    VISION_PREFIX,
    assemble,
    build_projector,
    checkpoint_files,
    hub_file,
    kept_elements,
    read_state,
)
from imagegen_pipeline.tiny_models import CLIP_MEAN, CLIP_STD, write_json, write_t5_tokenizer
from imagegen_pipeline.torch_runtime import checkpoint_tensor_sizes

REPO_ID = "zhiqiulin/clip-flant5-xl"  # 3.2B; zhiqiulin/clip-flant5-xxl (11.5B) is a setting
VISION_REPO_ID = "openai/clip-vit-large-patch14-336"
VISION_FILES = ("config.json", "preprocessor_config.json")
MODEL_FILES = (
    "config.json",
    "pytorch_model*.bin",  # xl: one file; shards with their index where a repo has them
    "pytorch_model.bin.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
# The source's prompt ('t5_chat' conversation style, t2v_metrics/constants.py) and answer.
SYSTEM_MSG = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
QUESTION = 'Does this figure show "{}"? Please answer yes or no.'
ANSWER = "Yes"
CONTEXT_LEN = 2048  # the source truncates token ids (the image counting as one) to this

# Tiny stand-in: words of the prompt that get whole tokens, and the real repo's 28 spare
# embedding rows beyond the tokenizer (32128 vs 32100), which the score must leave out.
TINY_WORDS = ("Yes", "yes", "no", "Does", "this", "figure", "show", "Please", "answer", "USER")
SPARE_ROWS = 28


class VqaScoreSettings(PreferenceScorerSettings):
    """VQAScore (CLIP-FlanT5, transformers): xl by default, `model` zhiqiulin/clip-flant5-xxl
    for the 11.5B xxl. Precision fp32 or bf16 (the source's); Flan-T5 overflows in fp16."""

    vision_tower: str = Field(
        "auto",
        description="'auto': the model config's mm_vision_tower "
        f"({VISION_REPO_ID}: its configs and image processor) from the hub cache, or its "
        "copy inside a local model folder; or a repo id or folder",
    )


def build_tiny(dest: Path) -> None:
    """A tiny CLIP-FlanT5 in the zhiqiulin/clip-flant5-xl layout: ``config.json`` (a Flan-T5
    config, ``model_type`` clip_t5, the ``mm_*`` keys the source writes and reads),
    ``generation_config.json``, one bf16 ``pytorch_model.bin`` holding the T5, vision tower
    and projector under the real key names (embedding aliases sharing one storage), a T5
    ``tokenizer.json`` with its configs (the real ``spiece.model`` needs sentencepiece, which
    transformers 5 does not read anyway). The vision tower's configs (a CLIPModel
    ``config.json`` and the real repo's ``preprocessor_config.json``: 336 px, patch 14) sit
    in ``clip-vit-large-patch14-336/``, since a local model has no hub to pair with."""
    import torch
    from transformers import CLIPConfig, CLIPVisionModel, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    vocab = write_t5_tokenizer(dest, extra_words=TINY_WORDS)
    specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    extra_ids = {"additional_special_tokens": [f"<extra_id_{i}>" for i in range(100)]}
    write_json(dest / "special_tokens_map.json", extra_ids | specials)
    vision_width = 32
    # As transformers 4.31 saved the fine-tuned google/flan-t5-xl config (at tiny sizes), with
    # the keys CLIP-T5's initialize_vision_modules adds. tie_word_embeddings false: Flan-T5
    # has its own lm_head and its decoder output is not rescaled.
    config: dict[str, Any] = json.loads(
        '{"_name_or_path": "google/flan-t5-xl",'
        ' "architectures": ["CLIPT5ForConditionalGeneration"], "d_ff": 64, "d_kv": 8,'
        ' "d_model": 32, "decoder_start_token_id": 0, "dropout_rate": 0.1,'
        ' "dense_act_fn": "gelu_new", "eos_token_id": 1, "feed_forward_proj": "gated-gelu",'
        ' "initializer_factor": 1.0, "is_encoder_decoder": true, "is_gated_act": true,'
        ' "layer_norm_epsilon": 1e-06, "model_type": "clip_t5", "n_positions": 512,'
        ' "num_decoder_layers": 2, "num_heads": 4, "num_layers": 2, "output_past": true,'
        ' "pad_token_id": 0, "relative_attention_max_distance": 128,'
        ' "relative_attention_num_buckets": 32, "tie_word_embeddings": false,'
        ' "torch_dtype": "bfloat16", "transformers_version": "4.31.0", "use_cache": true,'
        ' "use_mm_proj": true, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,'
        ' "mm_vision_select_feature": "patch"}'
    )
    config |= {
        "vocab_size": vocab + SPARE_ROWS,
        "mm_vision_tower": VISION_REPO_ID,
        "mm_hidden_size": vision_width,
    }
    write_json(dest / "config.json", config)
    generation = {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
    write_json(dest / "generation_config.json", {"_from_model_config": True, **generation})
    vision_dir = dest / Path(VISION_REPO_ID).name
    layers = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37}
    clip = CLIPConfig(
        text_config={"hidden_size": 32, "vocab_size": 99, "bos_token_id": 0, "eos_token_id": 2}
        | layers,
        vision_config={"hidden_size": vision_width, "image_size": 336, "patch_size": 14} | layers,
        projection_dim=32,
    )
    clip.save_pretrained(vision_dir)
    # The real repo's file, in the old feature-extractor format (sizes as plain numbers).
    steps = dict.fromkeys(("do_center_crop", "do_normalize", "do_resize"), True)
    sizes = {"crop_size": 336, "size": 336, "resample": 3}  # bicubic
    kind = {"feature_extractor_type": "CLIPFeatureExtractor"}
    normalize = {"image_mean": CLIP_MEAN, "image_std": CLIP_STD}
    write_json(vision_dir / "preprocessor_config.json", steps | sizes | kind | normalize)
    t5 = T5ForConditionalGeneration(T5Config.from_dict(config))
    vision = CLIPVisionModel(clip.vision_config)
    projector = build_projector(config, config["d_model"])
    bf16 = {"dtype": torch.bfloat16}
    shared = t5.shared.weight.detach().to(**bf16)
    # transformers 5 ties T5's lm_head to `shared`; Flan-T5 has its own (small: the random
    # logits then stay moderate, so every tiny score is a usable number).
    state = {k: v.to(**bf16) for k, v in t5.state_dict().items()}
    state["lm_head.weight"] = (0.02 * torch.randn(state["lm_head.weight"].shape)).to(**bf16)
    state |= {name: shared for name in EMBEDDING_NAMES}
    state |= {VISION_PREFIX + k: v.to(**bf16) for k, v in vision.state_dict().items()}
    state |= {PROJECTOR_PREFIX + k: v.to(**bf16) for k, v in projector.state_dict().items()}
    torch.save(state, dest / "pytorch_model.bin")


SPEC = ModelSpec(
    name="vqascore",
    role="scoring",
    implementation="imagegen_pipeline.scoring.vqascore:VqaScoreScorer",
    settings=VqaScoreSettings,
    default_model=REPO_ID,
    model_env_var="IMAGEGEN_VQASCORE_MODEL",
    weights=WeightSource(
        REPO_ID,
        allow_patterns=MODEL_FILES,
        index_file="pytorch_model.bin",
        companions=(
            WeightSource(
                VISION_REPO_ID, allow_patterns=VISION_FILES, index_file="preprocessor_config.json"
            ),
        ),
    ),
    tiny_builder=build_tiny,
)


class VqaScoreScorer(LoadedScorer):
    """VQAScore, loaded once per step; :meth:`score` gives P("Yes") per (image, prompt)."""

    config: VqaScoreSettings

    def __init__(self, config: VqaScoreSettings, model_id: str | None = None) -> None:
        if config.precision == "fp16":
            raise ValueError("vqascore runs in fp32 or bf16: Flan-T5 overflows in fp16")
        super().__init__(config, model_id)
        self.tokenizer: Any = None
        self.processor: Any = None
        self.model_config: dict[str, Any] = {}

    def _source(self) -> tuple[str, dict[str, Any]]:
        """The model (folder or repo id) and how transformers may resolve its files."""
        model = self.config.model.removeprefix(LOCAL_DIR)
        return model, {
            "revision": self.config.revision,
            "local_files_only": not self.config.allow_download,
        }

    def weight_files(self) -> list[Path]:
        """The CLIP-T5 checkpoint's files (T5, vision tower and projector together)."""
        return [Path(file) for file in checkpoint_files(*self._source())]

    def weight_elements(self) -> int:
        return kept_elements(checkpoint_tensor_sizes(self.weight_files()))

    def load(self) -> float:
        """Load the model, its tokenizer and image processor (once), from local files unless
        allowed to download."""
        if self.model is not None:
            return 0.0
        import torch
        from transformers import CLIPImageProcessorPil, CLIPVisionConfig, T5Tokenizer

        started = time.perf_counter()
        model, hub = self._source()
        try:
            raw = json.loads(Path(hub_file(model, "config.json", hub)).read_text(encoding="utf-8"))
            tokenizer = T5Tokenizer.from_pretrained(model, **hub)  # its tokenizer.json
            state = read_state(checkpoint_files(model, hub))
        except OSError as error:
            raise ModelWeightsMissingError(
                missing_weights_message(model, self.config.revision, str(error))
            ) from None
        vision = self._vision_source(model, raw)
        try:
            vision_config = CLIPVisionConfig.from_pretrained(vision, **hub | {"revision": None})
            # The PIL processor: what the source's transformers 4 CLIPImageProcessor was (the
            # torchvision one of transformers 5 resizes differently, by up to 0.015).
            processor = CLIPImageProcessorPil.from_pretrained(vision, **hub | {"revision": None})
        except OSError as error:
            raise ModelWeightsMissingError(
                missing_weights_message(vision, None, str(error))
            ) from None
        dtype = getattr(torch, TORCH_DTYPES[self.config.precision])
        self.model = assemble(raw, vision_config, state, dtype).to(self.device).eval()
        self.tokenizer, self.processor, self.model_config = tokenizer, processor, raw
        self.load_seconds = time.perf_counter() - started
        self.model_loads += 1
        return self.load_seconds

    def _vision_source(self, model: str, raw: dict[str, Any]) -> str:
        if self.config.vision_tower != "auto":
            return self.config.vision_tower
        name = raw.get("mm_vision_tower", VISION_REPO_ID)
        copy = Path(model).expanduser() / Path(name).name
        return str(copy) if Path(model).expanduser().is_dir() and copy.is_dir() else name

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """VQAScore of each image against its prompt, batch_size at a time."""
        import torch

        self.load()
        t5, tokenize = self.model["t5"], self.tokenizer
        prefix = tokenize(f"{SYSTEM_MSG} USER: ").input_ids  # the text before <image>, with </s>
        answer = torch.tensor([tokenize(ANSWER).input_ids], device=self.device)
        # Teacher forcing: the decoder reads the start token, then the answer but its last token.
        start = torch.tensor([[self.model_config.get("decoder_start_token_id", 0)]])
        decoder_ids = torch.cat([start.to(self.device), answer[:, :-1]], dim=1)
        fill = tuple(int(255 * x) for x in self.processor.image_mean)
        scores: list[float] = []
        size = self.config.batch_size
        for first in range(0, len(images), size):
            batch = [_square(image.convert("RGB"), fill) for image in images[first : first + size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            questions = [
                f"\n{QUESTION.format(prompt)} ASSISTANT: "
                for prompt in prompts[first : first + size]
            ]
            with torch.inference_mode():
                features = self._image_tokens(pixels.to(self.device, t5.dtype))
                questions_ids = tokenize(questions).input_ids
                embeds, mask = self._encoder_inputs(prefix, questions_ids, features)
                logits = t5(
                    inputs_embeds=embeds,
                    attention_mask=mask,
                    decoder_input_ids=decoder_ids.expand(len(batch), -1),
                ).logits
            scores += answer_probability(logits, answer, len(self.tokenizer)).tolist()
        return scores

    def _image_tokens(self, pixels: Any) -> Any:
        """The projected patch features of the vision tower's selected layer."""
        hidden = self.model["vision_tower"](pixel_values=pixels, output_hidden_states=True)
        features = hidden.hidden_states[self.model_config.get("mm_vision_select_layer", -2)]
        if self.model_config.get("mm_vision_select_feature", "patch") == "patch":
            features = features[:, 1:]  # "patch": without the CLS token
        return self.model["mm_projector"](features)

    def _encoder_inputs(
        self, prefix: list[int], questions: list[list[int]], features: Any
    ) -> tuple[Any, Any]:
        """T5 input embeddings (prefix, image tokens, question), right-padded, and their mask:
        padding is masked, so a pair's score does not depend on its batch."""
        import torch

        embed = self.model["t5"].get_input_embeddings()

        def tokens(values: list[int]) -> Any:
            return embed(torch.tensor(values, device=self.device))

        room = CONTEXT_LEN - len(prefix) - 1
        rows = [
            torch.cat([tokens(prefix), image, tokens(question[:room])])
            for image, question in zip(features, questions, strict=True)
        ]
        lengths = torch.tensor([len(row) for row in rows], device=self.device)
        embeds = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        mask = torch.arange(embeds.shape[1], device=self.device)[None, :] < lengths[:, None]
        return embeds, mask.long()


def answer_probability(logits: Any, answer: Any, vocab_size: int) -> Any:
    """exp(-mean cross-entropy) of the ``answer`` tokens under ``logits`` (batch, tokens,
    vocab), over the first ``vocab_size`` ids: the source's score, per row."""
    import torch

    log_probs = torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)
    chosen = log_probs.gather(-1, answer.expand(len(logits), -1).unsqueeze(-1)).squeeze(-1)
    return chosen.mean(dim=-1).exp()


def _square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """The image centred on a square of ``fill`` (the source's expand2square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas
