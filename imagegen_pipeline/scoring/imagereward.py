"""ImageReward: BLIP-large fine-tuned on 137k expert comparisons (on transformers), Dagster-free.

The real scorer is ``ImageReward.load("ImageReward-v1.0").score(prompt, image)`` of the package
``image-reward``, which cannot be installed beside this project (its 1.5 release pins
``timm==0.6.13``; open-clip-torch needs ``timm>=1.0.17``). This module runs the same network on
transformers' BLIP classes instead, from the same files of the hub repo ``THUDM/ImageReward``:
``ImageReward.pt`` (the ``state_dict()`` of the package's ``ImageReward`` module, under BLIP's
original names) and ``med_config.json`` (its BERT config), with the ``bert-base-uncased``
tokenizer that BLIP extends by ``[DEC]`` and ``[ENC]``.

The network (ImageReward/ImageReward.py and models/BLIP/ of THUDM/ImageReward): BLIP's ViT-L/16
at 224 px embeds the image; BLIP's BERT text encoder reads the prompt (35 tokens, padded) with
cross-attention to every image token; an MLP maps the text's first ([CLS]) token to one number,
and the score is ``(mlp(cls) - 0.16717362830052426) / 1.0333394966054072``, which the authors
say "roughly follows the standard normal distribution" (their README's examples: -2.03 to 0.58;
higher is preferred). ImageReward agrees with people on 65 % of its test pairs (paper, Table 2).
"""

from __future__ import annotations

import json
import math
import string
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import Field

from imagegen_pipeline.model_settings import LOCAL_DIR
from imagegen_pipeline.model_spec import ModelSpec, WeightSource
from imagegen_pipeline.model_weights import ModelWeightsMissingError, missing_weights_message
from imagegen_pipeline.scoring.imagereward_checkpoint import (
    CHECKPOINT,
    MED_CONFIG,
    REAL_MED,
    blip_configs,
    original_shapes,
    reward_head,
    split_checkpoint,
)
from imagegen_pipeline.scoring.preference import (
    TORCH_DTYPES,
    LoadedScorer,
    PreferenceScorerSettings,
)
from imagegen_pipeline.tiny_models import CLIP_MEAN, CLIP_STD, COMMON_WORDS, write_json
from imagegen_pipeline.torch_runtime import checkpoint_tensor_sizes

REPO_ID = "THUDM/ImageReward"  # its files: CHECKPOINT and MED_CONFIG
TOKENIZER_REPO_ID = "bert-base-uncased"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json")
# BLIP's init_tokenizer() adds these to bert-base-uncased (ids 30522 and 30523, hence the
# 30524 rows of the checkpoint's word embeddings). ImageReward's score() feeds the plain
# tokenizer output: its first token stays [CLS], it is not replaced by [ENC].
BOS_TOKEN, ENC_TOKEN = "[DEC]", "[ENC]"
MAX_TOKENS = 35  # score(): padding="max_length", truncation=True, max_length=35
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072


class ImageRewardSettings(PreferenceScorerSettings):
    """The ImageReward human-preference scorer (BLIP on transformers + ImageReward.pt)."""

    tokenizer: str = Field(
        "auto",
        description=f"'auto': the model folder's own vocab.txt if it has one, else "
        f"{TOKENIZER_REPO_ID} from the hub cache; or a repo id or folder",
    )


# --------------------------------------------------------------------------------------------
# The tiny stand-in, in the THUDM/ImageReward layout
# --------------------------------------------------------------------------------------------

TINY_VISION = {"width": 128, "depth": 2, "patch": 16, "image": 224}  # 2 heads of 64
TINY_MED = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
            "num_attention_heads": 2}  # fmt: skip


def write_bert_tokenizer(dest: Path) -> int:
    """A tiny uncased WordPiece tokenizer in the bert-base-uncased layout (``vocab.txt``,
    ``tokenizer.json``, ``tokenizer_config.json``); returns its size. Its special tokens have
    the real ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103); then single characters
    and their ``##`` continuations (so any ASCII prompt tokenizes) and a few whole words."""
    from transformers import BertTokenizer

    chars = string.punctuation + string.digits + string.ascii_lowercase
    tokens = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [*chars, *(f"##{c}" for c in string.digits + string.ascii_lowercase)]
    tokens += [word for word in COMMON_WORDS if word not in tokens]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    write_json(dest / "tokenizer_config.json", {"do_lower_case": True, "model_max_length": 512})
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(tokens)})
    tokenizer.backend_tokenizer.save(str(dest / "tokenizer.json"))
    return len(tokens)


def build_tiny(dest: Path) -> None:
    """A tiny ImageReward in the THUDM/ImageReward layout: ``ImageReward.pt`` (a plain state
    dict under BLIP's original names, with the keys the real one carries and the score
    ignores) and ``med_config.json``, at tiny widths but the real 224 px, patch 16, 35 tokens
    and MLP head; with bert-base-uncased's tokenizer files beside them, since a local model has
    no hub to pair with."""
    import torch

    torch.manual_seed(0)
    vocab_size = write_bert_tokenizer(dest) + 2  # + [DEC] and [ENC], as BLIP adds them
    med = REAL_MED | TINY_MED | {"vocab_size": vocab_size}
    write_json(dest / MED_CONFIG, med)
    state: dict[str, Any] = {}
    for name, shape in original_shapes(vocab_size, med, TINY_VISION).items():
        if len(shape) == 1:  # biases around 0, LayerNorm scales around 1
            state[name] = 0.1 * torch.randn(shape) + float(name.endswith(".weight"))
        elif name.endswith(("cls_token", "pos_embed", "embeddings.weight")):
            state[name] = 0.02 * torch.randn(shape)
        else:  # unit-gain weights, so the tiny scores vary visibly with image and prompt
            state[name] = torch.randn(shape) / math.sqrt(math.prod(shape[1:]))
    positions = med["max_position_embeddings"]
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(positions).expand(1, -1)
    torch.save(state, dest / CHECKPOINT)


SPEC = ModelSpec(
    name="imagereward",
    role="scoring",
    implementation="imagegen_pipeline.scoring.imagereward:ImageRewardScorer",
    settings=ImageRewardSettings,
    default_model=REPO_ID,
    model_env_var="IMAGEGEN_IMAGEREWARD_MODEL",
    weights=WeightSource(
        REPO_ID,
        allow_patterns=(CHECKPOINT, MED_CONFIG),
        index_file=CHECKPOINT,
        companions=(
            WeightSource(TOKENIZER_REPO_ID, allow_patterns=TOKENIZER_FILES, index_file="vocab.txt"),
        ),
    ),
    tiny_builder=build_tiny,
)


# --------------------------------------------------------------------------------------------
# BLIP's names -> transformers' BlipVisionModel / BlipTextModel
# --------------------------------------------------------------------------------------------


def _is_folder(name: str) -> bool:
    """A folder (or a path meant as one), not a hub repo id."""
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().is_dir()


class ImageRewardScorer(LoadedScorer):
    """ImageReward, loaded once per step; :meth:`score` ranks (image, prompt) pairs."""

    config: ImageRewardSettings

    def __init__(self, config: ImageRewardSettings, model_id: str | None = None) -> None:
        super().__init__(config, model_id)
        self.preprocess: Any = None
        self.tokenizer: Any = None

    def _missing(self, model: str, detail: str) -> ModelWeightsMissingError:
        return ModelWeightsMissingError(
            missing_weights_message(model, self.config.revision, detail)
            + f" `imagegen models pull {SPEC.name}` fetches {REPO_ID}'s files and the "
            f"{TOKENIZER_REPO_ID} tokenizer it reads."
        )

    def _hub_file(self, repo_id: str, filename: str, revision: str | None) -> Path:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:  # from the cache only, unless this scorer may download: steps never do
            path = hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                local_files_only=not self.config.allow_download,
            )
        except (OSError, EntryNotFoundError) as error:
            raise self._missing(repo_id, str(error)) from None
        return Path(path)

    def _files(self) -> tuple[Path, Path, Path]:
        """(ImageReward.pt, med_config.json, the tokenizer's folder)."""
        model = self.config.model.removeprefix(LOCAL_DIR)
        folder = Path(model).expanduser()
        if self.config.model.startswith(LOCAL_DIR) or _is_folder(model):
            files = folder / CHECKPOINT, folder / MED_CONFIG
            if not all(path.is_file() for path in files):
                raise self._missing(str(folder), f"needs {CHECKPOINT} and {MED_CONFIG}")
        else:
            revision = self.config.revision
            files = tuple(
                self._hub_file(model, name, revision) for name in (CHECKPOINT, MED_CONFIG)
            )
            folder = None
        tokenizer = self.config.tokenizer
        if tokenizer == "auto":
            own = folder is not None and (folder / "vocab.txt").is_file()
            tokenizer = str(folder) if own else TOKENIZER_REPO_ID
        tokenizer_folder = Path(tokenizer).expanduser()
        if not _is_folder(tokenizer):  # a repo id; transformers' BertTokenizer falls back to
            # a 5-token vocabulary when it finds no files, so find vocab.txt first
            tokenizer_folder = self._hub_file(tokenizer, "vocab.txt", None).parent
        elif not (tokenizer_folder / "vocab.txt").is_file():
            raise self._missing(str(tokenizer_folder), "the tokenizer folder needs vocab.txt")
        return files[0], files[1], tokenizer_folder

    def weight_files(self) -> list[Path]:
        """ImageReward.pt: BLIP's two towers and the reward head in one file."""
        return [self._files()[0]]

    def weight_elements(self) -> int:
        # What split_checkpoint keeps (the file also holds tensors the towers drop); it reads
        # names only, so element counts stand in for the tensors.
        sizes = checkpoint_tensor_sizes(self.weight_files())
        return sum(sum(part.values()) for part in split_checkpoint(sizes))

    def load(self) -> float:
        """Load the checkpoint into BLIP's two towers and the head, strictly (once)."""
        if self.model is not None:
            return 0.0
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
        from transformers.initialization import no_init_weights

        started = time.perf_counter()
        checkpoint, med_file, tokenizer_folder = self._files()
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        vision_config, text_config = blip_configs(
            state, json.loads(med_file.read_text(encoding="utf-8"))
        )
        vision_state, text_state, mlp_state = split_checkpoint(state)
        with no_init_weights():  # no random draws for what is loaded next (seconds at ViT-L)
            vision = BlipVisionModel(vision_config)
            text = BlipTextModel(text_config, add_pooling_layer=False)  # as BLIP_Pretrain
            head = reward_head(mlp_state)
        for module, part in ((vision, vision_state), (text, text_state), (head, mlp_state)):
            module.load_state_dict(part, strict=True)  # every tensor, no leftovers
        tokenizer = BertTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
        tokenizer.add_special_tokens({"bos_token": BOS_TOKEN})
        tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
        if len(tokenizer) != text_config.vocab_size:
            raise ValueError(
                f"the tokenizer in {tokenizer_folder} has {len(tokenizer)} tokens with "
                f"{BOS_TOKEN} and {ENC_TOKEN}, the checkpoint embeds {text_config.vocab_size}"
            )
        dtype = getattr(torch, TORCH_DTYPES[self.config.precision])
        # The head runs in float32 as in score(), which casts the [CLS] feature with .float().
        parts = {"vision": vision.to(self.device, dtype), "text": text.to(self.device, dtype)}
        self.model = torch.nn.ModuleDict(parts | {"mlp": head.to(self.device)}).eval()
        side = vision_config.image_size
        # ImageReward's _transform(224): CLIP's preprocessing, RGB conversion after the crop.
        self.preprocess = Compose(
            [
                Resize(side, interpolation=InterpolationMode.BICUBIC),
                CenterCrop(side),
                lambda image: image.convert("RGB"),
                ToTensor(),
                Normalize(CLIP_MEAN, CLIP_STD),
            ]
        )
        self.tokenizer = tokenizer
        self.load_seconds = time.perf_counter() - started
        self.model_loads += 1
        return self.load_seconds

    def rewards(self, pixels: Any, input_ids: Any, attention_mask: Any) -> Any:
        """ImageReward.score() on tensors: the text's [CLS] state after cross-attending to
        the image, through the head, normalised by the training rewards' mean and std."""
        image_embeds = self.model["vision"](pixel_values=pixels).last_hidden_state
        # No encoder mask: every image token is real (score() passes all ones).
        text = self.model["text"](
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            is_decoder=False,
        )
        reward = self.model["mlp"](text.last_hidden_state[:, 0].float()).squeeze(-1)
        return (reward - REWARD_MEAN) / REWARD_STD

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """ImageReward of each image against its prompt, batch_size at a time."""
        import torch

        self.load()
        dtype = next(self.model["vision"].parameters()).dtype
        scores: list[float] = []
        size = self.config.batch_size
        for start in range(0, len(images), size):
            pixels = torch.stack([self.preprocess(image) for image in images[start : start + size]])
            # Padded to 35 tokens whatever the batch: a prompt's tokens never depend on it.
            tokens = self.tokenizer(
                list(prompts[start : start + size]),
                padding="max_length",
                truncation=True,
                max_length=MAX_TOKENS,
                return_tensors="pt",
            )
            with torch.inference_mode():
                rewards = self.rewards(
                    pixels.to(self.device, dtype),
                    tokens["input_ids"].to(self.device),
                    tokens["attention_mask"].to(self.device),
                )
            scores += rewards.tolist()
        return scores
