"""HPS v2.1 (Human Preference Score): open_clip ViT-H-14 fine-tuned on human choices, Dagster-free.

The real scorer is the one ``hpsv2.score`` runs: open_clip's ``ViT-H-14`` architecture with
every weight replaced by the HPS checkpoint (``HPS_v2.1_compressed.pt`` of the hub repo
``xswu/HPSv2``, a ``{"state_dict": ...}`` of the whole CLIP), ViT-H-14's preprocessing and
tokenizer, and as score the cosine of the normalised image and text embeddings (about 0.2 to
0.35 for real pictures; higher is preferred). HPS v2.1 agrees with people about 83 % of the
time on HPD v2, against 57-77 % for aesthetic predictors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import Field

from imagegen_pipeline.model_settings import LOCAL_DIR
from imagegen_pipeline.model_spec import ModelSpec, WeightSource
from imagegen_pipeline.model_weights import ModelWeightsMissingError
from imagegen_pipeline.scoring.preference import LoadedScorer, PreferenceScorerSettings
from imagegen_pipeline.tiny_models import CLIP_MEAN, CLIP_STD, write_json

REPO_ID = "xswu/HPSv2"
CHECKPOINT = "HPS_v2.1_compressed.pt"
ARCHITECTURE = "ViT-H-14"


class Hpsv2Settings(PreferenceScorerSettings):
    """The HPS v2.1 human-preference scorer (open_clip ViT-H-14 + the HPS checkpoint)."""

    checkpoint_file: str = Field(CHECKPOINT, description="the HPS weights file of the repo")
    architecture: str = Field(ARCHITECTURE, description="the open_clip model the weights fit")


def build_tiny(dest: Path) -> None:
    """A tiny HPS in the xswu/HPSv2 layout: ``HPS_v2.1_compressed.pt`` holding
    ``{"state_dict": ...}`` with ViT-H-14's state-dict keys (patch 14, 224 px, the real
    77-token context and 49408-token vocabulary, so open_clip's own tokenizer and
    preprocessing apply), at tiny widths. The real repo has no architecture file (open_clip
    knows ViT-H-14); the tiny widths are in ``open_clip_config.json`` beside the checkpoint."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 224,
            "layers": 2,
            "width": 32,
            "head_width": 16,
            "patch_size": 14,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 2,
        },
    }
    model = open_clip.CLIP(**model_cfg)
    dest.mkdir(parents=True, exist_ok=True)
    write_json(
        dest / "open_clip_config.json",
        {"model_cfg": model_cfg, "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD}},
    )
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    torch.save({"state_dict": state}, dest / CHECKPOINT)


SPEC = ModelSpec(
    name="hpsv2",
    role="scoring",
    implementation="imagegen_pipeline.scoring.hpsv2:Hpsv2Scorer",
    settings=Hpsv2Settings,
    default_model=REPO_ID,
    model_env_var="IMAGEGEN_HPSV2_MODEL",
    weights=WeightSource(REPO_ID, allow_patterns=(CHECKPOINT,), index_file=CHECKPOINT),
    tiny_builder=build_tiny,
)


class _RandomInitWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "no CLIP weights found" not in message and "initialized randomly" not in message


@contextmanager
def _without_random_init_warnings() -> Iterator[None]:
    root, dropped = logging.getLogger(), _RandomInitWarnings()
    root.addFilter(dropped)
    try:
        yield
    finally:
        root.removeFilter(dropped)


class Hpsv2Scorer(LoadedScorer):
    """HPS v2.1, loaded once per step; :meth:`score` ranks (image, prompt) pairs."""

    config: Hpsv2Settings

    def __init__(self, config: Hpsv2Settings, model_id: str | None = None) -> None:
        super().__init__(config, model_id)
        self.preprocess: Any = None
        self.tokenizer: Any = None

    def _sources(self) -> tuple[str, Path, bool]:
        """(open_clip model name, checkpoint file, whether the name is a local-dir config)."""
        model = self.config.model
        folder = Path(model.removeprefix(LOCAL_DIR)).expanduser()
        if model.startswith(LOCAL_DIR) or folder.is_dir():
            checkpoint = folder / self.config.checkpoint_file
            if not checkpoint.is_file():
                raise ModelWeightsMissingError(f"HPS checkpoint {str(checkpoint)!r} is missing.")
            if (folder / "open_clip_config.json").is_file():
                return f"{LOCAL_DIR}{folder}", checkpoint, True
            return self.config.architecture, checkpoint, False
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        found = try_to_load_from_cache(
            model, self.config.checkpoint_file, revision=self.config.revision
        )
        if not isinstance(found, str):
            if not self.config.allow_download:
                raise ModelWeightsMissingError(
                    f"HPS weights {model}/{self.config.checkpoint_file} are not on this machine. "
                    "Run `imagegen models pull hpsv2` on a machine that reaches the Hugging Face "
                    "Hub (copy its HF_HOME cache here if this machine is offline), or set the "
                    "hpsv2 `model` to a folder holding the checkpoint. Steps never download."
                )
            found = hf_hub_download(
                model, self.config.checkpoint_file, revision=self.config.revision
            )
        return self.config.architecture, Path(found), False

    def weight_files(self) -> list[Path]:
        """The HPS checkpoint (it holds every weight, tower and head)."""
        return [self._sources()[1]]

    def load(self) -> float:
        """Load the model, its preprocessing and tokenizer (once)."""
        if self.model is not None:
            return 0.0
        import open_clip

        started = time.perf_counter()
        name, checkpoint, local_config = self._sources()
        common = {"precision": self.config.precision, "device": self.device}
        if local_config:  # a config beside the weights: build it, then load the HPS file
            # open_clip warns that a folder without its own weights file is "initialized
            # randomly": not so here, the HPS checkpoint is loaded into it next.
            with _without_random_init_warnings():
                model, _, preprocess = open_clip.create_model_and_transforms(name, **common)
            open_clip.load_checkpoint(model, str(checkpoint), strict=True)
        else:  # ViT-H-14 from open_clip's own config, every weight from the HPS file
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=str(checkpoint), **common
            )
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(name)
        self.load_seconds = time.perf_counter() - started
        self.model_loads += 1
        return self.load_seconds

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """The HPS of each image against its prompt: cos(image, text), batch_size at a time."""
        import torch
        import torch.nn.functional as F

        self.load()
        dtype = next(self.model.parameters()).dtype
        scores: list[float] = []
        size = self.config.batch_size
        for start in range(0, len(images), size):
            batch = [image.convert("RGB") for image in images[start : start + size]]
            pixels = torch.stack([self.preprocess(image) for image in batch])
            tokens = self.tokenizer(list(prompts[start : start + size])).to(self.device)
            with torch.inference_mode():
                image_features = self.model.encode_image(pixels.to(self.device, dtype=dtype))
                text_features = self.model.encode_text(tokens)
            cosines = F.normalize(image_features.float(), dim=-1) * F.normalize(
                text_features.float(), dim=-1
            )
            scores += cosines.sum(dim=-1).tolist()
        return scores
