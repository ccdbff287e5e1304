"""PickScore: CLIP-H fine-tuned on the Pick-a-Pic preferences (transformers), Dagster-free.

The real scorer is the model card's: ``CLIPModel.from_pretrained("yuvalkirstain/PickScore_v1")``
with the processor of the CLIP it was fine-tuned from,
``CLIPProcessor.from_pretrained("laion/CLIP-ViT-H-14-laion2B-s32B-b79K")``; the score is
``logit_scale.exp() * cos(image, text)`` (about 18-23 for real pictures; higher is preferred).
PickScore agrees with people about 70 % of the time on Pick-a-Pic.
"""

from __future__ import annotations

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
from imagegen_pipeline.tiny_models import (
    CLIP_MEAN,
    CLIP_STD,
    clip_text_config,
    write_clip_tokenizer,
)
from imagegen_pipeline.torch_runtime import local_model_folder

REPO_ID = "yuvalkirstain/PickScore_v1"
PROCESSOR_REPO_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PROCESSOR_FILES = ("*.json", "*.txt")  # the processor's configs and BPE vocabulary, no weights


class PickScoreSettings(PreferenceScorerSettings):
    """The PickScore human-preference scorer (transformers CLIPModel + CLIPProcessor)."""

    processor: str = Field(
        "auto",
        description=f"'auto': {PROCESSOR_REPO_ID} for the hub model, the model's own folder "
        "for a local one; or a repo id or folder",
    )


def build_tiny(dest: Path) -> None:
    """A tiny PickScore in the yuvalkirstain/PickScore_v1 layout (``config.json`` of a
    ``CLIPModel`` with ViT-H-14's patch 14 and 224 px, ``model.safetensors``) at tiny widths,
    with the processor files of the laion repo (``preprocessor_config.json``, ``vocab.json``,
    ``merges.txt``, tokenizer configs) beside it, since a local model has no hub to pair with."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    vocab_size = write_clip_tokenizer(dest)
    text = clip_text_config(vocab_size, hidden_act="gelu")
    vision = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "gelu",
    }
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision, projection_dim=32)
    CLIPModel(config).save_pretrained(dest)
    CLIPImageProcessor(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=3,  # bicubic, as the real processor
    ).save_pretrained(dest)


SPEC = ModelSpec(
    name="pickscore",
    role="scoring",
    implementation="imagegen_pipeline.scoring.pickscore:PickScoreScorer",
    settings=PickScoreSettings,
    default_model=REPO_ID,
    model_env_var="IMAGEGEN_PICKSCORE_MODEL",
    weights=WeightSource(
        REPO_ID,
        allow_patterns=("config.json", "*.safetensors"),
        index_file="config.json",
        companions=(
            WeightSource(
                PROCESSOR_REPO_ID,
                allow_patterns=PROCESSOR_FILES,
                index_file="preprocessor_config.json",
            ),
        ),
    ),
    tiny_builder=build_tiny,
)


class PickScoreScorer(LoadedScorer):
    """PickScore, loaded once per step; :meth:`score` ranks (image, prompt) pairs."""

    config: PickScoreSettings

    def __init__(self, config: PickScoreSettings, model_id: str | None = None) -> None:
        super().__init__(config, model_id)
        self.processor: Any = None

    def _paths(self) -> tuple[str, str]:
        model = self.config.model.removeprefix(LOCAL_DIR)
        processor = self.config.processor
        if processor == "auto":
            processor = model if Path(model).expanduser().is_dir() else PROCESSOR_REPO_ID
        return model, processor

    def weight_files(self) -> list[Path]:
        """The model's weight files: safetensors when present (what transformers loads
        first), else its torch .bin; in its folder or its Hugging Face cache snapshot."""
        model, _ = self._paths()
        folder = local_model_folder(model, self.config.revision)
        if folder is None:
            return []
        return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))

    def load(self) -> float:
        """Load the model and its processor (once), from local files unless allowed."""
        if self.model is not None:
            return 0.0
        import torch
        from transformers import CLIPModel, CLIPProcessor

        started = time.perf_counter()
        model_path, processor_path = self._paths()
        local_only = not self.config.allow_download
        dtype = getattr(torch, TORCH_DTYPES[self.config.precision])
        try:
            model = CLIPModel.from_pretrained(
                model_path, revision=self.config.revision, local_files_only=local_only, dtype=dtype
            )
            processor = CLIPProcessor.from_pretrained(processor_path, local_files_only=local_only)
        except OSError as error:
            missing = model_path if "PickScore" in str(error) else processor_path
            raise ModelWeightsMissingError(
                missing_weights_message(missing, self.config.revision, str(error))
            ) from None
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.load_seconds = time.perf_counter() - started
        self.model_loads += 1
        return self.load_seconds

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """PickScore of each image against its prompt, batch_size at a time."""
        import torch
        import torch.nn.functional as F

        self.load()
        scores: list[float] = []
        size = self.config.batch_size
        dtype = next(self.model.parameters()).dtype
        for start in range(0, len(images), size):
            batch = [image.convert("RGB") for image in images[start : start + size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            text = self.processor(
                text=list(prompts[start : start + size]),
                padding=True,
                truncation=True,
                max_length=77,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                image_embeds = _features(
                    self.model.get_image_features(pixel_values=pixels.to(self.device, dtype))
                )
                text_embeds = _features(self.model.get_text_features(**text))
                cosines = (
                    F.normalize(image_embeds.float(), dim=-1)
                    * F.normalize(text_embeds.float(), dim=-1)
                ).sum(dim=-1)
                scores += (self.model.logit_scale.exp().float() * cosines).tolist()
        return scores


def _features(output: Any) -> Any:
    """Projected embeddings: transformers 5 returns them as the pooler output of a model
    output, earlier versions as a tensor."""
    return getattr(output, "pooler_output", output)
