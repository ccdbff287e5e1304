"""CLIP scores with open_clip, Dagster-free: prompt alignment, aesthetics, video consistency.

The default model is ViT-L-14 with OpenAI's weights, the model torchmetrics' ``CLIPScore`` and
the LAION aesthetic predictor are built on, so the numbers compare with published ones.

Scores of one image:

- ``clip_score`` / ``clip_score_enhanced``: CLIPScore, ``max(100 * cos(image, text), 0)``,
  against the user's original prompt and against the enhanced prompt the model was given.
  Prompts longer than the text tower's context (77 tokens) are truncated by the tokenizer;
  ``*_truncated`` says so, from the tokenizer's own token count.
- ``aesthetic`` and ``aesthetic_<aspect>`` for composition, lighting, colours, sharpness and
  style: zero-shot CLIP probabilities. Each aspect has positive and negative descriptions whose
  normalised text embeddings are averaged per side (prompt ensembling); the score is
  ``softmax(100 * [cos(image, positive), cos(image, negative)])[0]``, i.e.
  ``sigmoid(100 * (cos_pos - cos_neg))``: the probability CLIP gives the positive description,
  0 to 1, 0.5 undecided. The temperature is CLIP's (and CLIPScore's) 100, fixed rather than the
  model's learned scale so scores compare across models.
- ``laion_aesthetic`` (only with a head file): the LAION aesthetic predictor, a
  ``Linear(768, 1)`` on L2-normalised ViT-L-14 image embeddings, roughly 1 to 10.

Scores of one video clip (cosine similarities of normalised image embeddings, -1 to 1):
``source_similarity`` (each frame to the source image, mean and min) and
``temporal_consistency`` (consecutive frames, mean and min).

An image's scores depend on that image alone, never on the batch it was scored in.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from PIL import Image
from pydantic import Field

from imagegen_pipeline.model_settings import HF_HUB, LOCAL_DIR, ModelSettings
from imagegen_pipeline.model_spec import ModelSpec, WeightSource
from imagegen_pipeline.scoring.open_clip_loading import load_aesthetic_head, open_clip_source
from imagegen_pipeline.tiny_models import CLIP_MEAN, CLIP_STD, write_json

if TYPE_CHECKING:
    import torch
from imagegen_pipeline.torch_runtime import free_accelerator_memory, module_bytes, resolve_device

TEMPERATURE = 100.0

# (positive descriptions, negative descriptions) per aspect; "aesthetic" is the overall one.
ASPECTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "aesthetic": (
        ("a beautiful, high quality image", "a stunning, award-winning picture"),
        ("an ugly, low quality image", "a bad, amateurish picture"),
    ),
    "composition": (
        ("a well composed image with a clear subject",),
        ("a cluttered, badly framed image",),
    ),
    "lighting": (
        ("an image with beautiful, well balanced lighting",),
        ("an image with harsh, flat or murky lighting",),
    ),
    "colours": (
        ("an image with vibrant, harmonious colours",),
        ("an image with dull, muddy, clashing colours",),
    ),
    "sharpness": (
        ("a sharp, crisp, detailed image",),
        ("a blurry, out of focus, noisy image",),
    ),
    "style": (
        ("an image with a consistent, polished style",),
        ("an image with an inconsistent, messy style",),
    ),
}
ASPECT_COLUMNS = ["aesthetic" if name == "aesthetic" else f"aesthetic_{name}" for name in ASPECTS]


class ClipModelSettings(ModelSettings):
    """The CLIP model (open_clip) that scores images and video clips."""

    pretrained: str | None = Field("openai", description="weights tag of an open_clip model name")
    checkpoint: str | None = Field(None, description="a local weights file for the model name")
    quick_gelu: bool | None = Field(None, description="None: as the pretrained tag says")
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="fp32 keeps scores comparable"
    )
    batch_size: int = Field(32, description="images per forward pass; scores do not depend on it")
    workers: int = Field(4, description="threads decoding and measuring images ahead of the model")
    aesthetic_head: str | None = Field(None, description="LAION linear head weights file")

    def scorer_label(self, model_id: str | None = None) -> str:
        """The model as recorded with every score (and part of each score's reuse key)."""
        if model_id and model_id != self.model:
            return model_id
        if self.model.startswith((LOCAL_DIR, HF_HUB)) or not self.pretrained:
            return self.model
        return f"{self.model}/{self.pretrained}"


def build_tiny(dest: Path) -> None:
    """Build a tiny open_clip CLIP in the hub layout (open_clip_config.json + safetensors).

    The real model is ``open_clip.create_model_and_transforms("ViT-L-14", pretrained="openai")``
    (weights from the hub repo ``timm/vit_large_patch14_clip_224.openai``, tokenizer
    ``open_clip.get_tokenizer("ViT-L-14")``). The tiny one loads from its directory through
    open_clip's ``local-dir:`` schema, which reads ``open_clip_config.json`` and the checkpoint
    next to it::

        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")

    The text tower keeps the real context length (77) and vocabulary size (49408) because the
    tokenizer is open_clip's own BPE SimpleTokenizer shipped in the package; the image tower
    keeps the real 224-pixel input, so the returned preprocess matches the real one.
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model_cfg = {
        "embed_dim": 32,
        # The OpenAI weights were trained with QuickGELU; open_clip sets this for that tag.
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": 224,
            "layers": 1,
            "width": 32,
            "head_width": 16,
            "patch_size": 32,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    model = open_clip.CLIP(**model_cfg)
    dest.mkdir(parents=True, exist_ok=True)
    write_json(
        dest / "open_clip_config.json",
        {"model_cfg": model_cfg, "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD}},
    )
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, dest / "open_clip_model.safetensors")


SPEC = ModelSpec(
    name="clip_model",
    role="scoring",
    implementation="imagegen_pipeline.scoring.clip_model:ClipModel",
    settings=ClipModelSettings,
    # ViT-L-14 with OpenAI's weights: the model CLIPScore and the LAION aesthetic head use.
    default_model="ViT-L-14",
    model_env_var="IMAGEGEN_CLIP_MODEL",
    weights=WeightSource(
        "timm/vit_large_patch14_clip_224.openai", open_clip_tag=("ViT-L-14", "openai")
    ),
    tiny_builder=build_tiny,
)
# What `imagegen models pull` calls the default weights, for the missing-weights message.
PULLED_AS = {SPEC.weights.open_clip_tag: SPEC.name}  # type: ignore[union-attr]


def token_count(tokenizer: Any, text: str) -> int:
    """Tokens the text tower would read for ``text``, start and end tokens included."""
    inner = getattr(tokenizer, "tokenizer", None)  # open_clip's wrapper of an HF tokenizer
    if inner is not None:
        clean = getattr(tokenizer, "clean_fn", lambda t: t)
        return len(inner(clean(text))["input_ids"])
    return len(tokenizer.encode(text)) + 2  # SimpleTokenizer: BPE tokens + <sot> + <eot>


class ClipModel:
    """An open_clip model, loaded once per step, scoring images and video clips in batches."""

    def __init__(self, config: ClipModelSettings, model_id: str | None = None) -> None:
        if config.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.config = config
        self.model_id = model_id
        self.device = resolve_device(config.device)
        self.model: Any = None
        self.preprocess: Any = None
        self.tokenizer: Any = None
        self.head: torch.nn.Linear | None = None
        self._texts: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, int] = {}
        self._aspects: torch.Tensor | None = None  # [aspects, 2, dim]: positive, negative
        self.load_seconds = 0.0  # how long the last load() took; 0 while never needed
        self.model_loads = 0

    @property
    def model_label(self) -> str:
        """The model as recorded with every score."""
        return self.config.scorer_label(self.model_id)

    @property
    def model_revision(self) -> str:
        """The revision of the weights ("main" unless pinned)."""
        return self.config.revision or "main"

    @property
    def context_length(self) -> int:
        """Tokens the text tower reads; longer prompts are truncated."""
        return int(getattr(self.tokenizer, "context_length", 77))

    def load(self) -> float:
        """Load model, tokenizer, optional head and the descriptions' embeddings (once)."""
        import torch

        if self.model is not None:
            return 0.0
        import open_clip

        started = time.perf_counter()
        name, kwargs = open_clip_source(self.config, PULLED_AS)
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, precision=self.config.precision, device=self.device, **kwargs
        )
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(name)
        if self.config.aesthetic_head:
            embed_dim = int(self.model.text_projection.shape[-1])
            self.head = load_aesthetic_head(self.config.aesthetic_head, embed_dim).to(self.device)
        # The descriptions are the same for every image: embed them once per step.
        sides = []
        for positives, negatives in ASPECTS.values():
            sides.append(torch.stack([self._ensemble(positives), self._ensemble(negatives)]))
        self._aspects = torch.stack(sides)
        self.load_seconds = time.perf_counter() - started
        self.model_loads += 1
        return self.load_seconds

    def unload(self) -> None:
        """Free the model and the accelerator memory it holds."""
        self.model = self.head = self._aspects = None
        self._texts.clear()
        free_accelerator_memory()

    def weight_bytes(self) -> int:
        """Memory the loaded model holds (for the warm-model cache)."""
        return module_bytes(self.model, self.head)

    def planned_weight_bytes(self) -> int | None:
        """What it holds once loaded; None before (open_clip's tags name no file to size)."""
        return self.weight_bytes() if self.model is not None else None

    # --- embeddings ---------------------------------------------------------------------------

    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 embeddings of a batch of preprocessed images."""
        import torch
        import torch.nn.functional as F

        dtype = next(self.model.parameters()).dtype
        with torch.inference_mode():
            features = self.model.encode_image(pixels.to(self.device, dtype=dtype))
        return F.normalize(features.float(), dim=-1)

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised embeddings of ``images``, ``batch_size`` at a time."""
        import torch

        self.load()
        chunks = []
        for start in range(0, len(images), self.config.batch_size):
            batch = images[start : start + self.config.batch_size]
            pixels = torch.stack([self.preprocess(image.convert("RGB")) for image in batch])
            chunks.append(self.embed_pixels(pixels))
        return torch.cat(chunks) if chunks else torch.empty(0, 0)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised embeddings of ``texts``; each distinct text is encoded once per step."""
        import torch
        import torch.nn.functional as F

        self.load()
        missing = list(dict.fromkeys(t for t in texts if t not in self._texts))
        for start in range(0, len(missing), self.config.batch_size):
            batch = missing[start : start + self.config.batch_size]
            tokens = self.tokenizer(batch).to(self.device)
            with torch.inference_mode():
                features = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
            self._texts.update(zip(batch, features, strict=True))
        return torch.stack([self._texts[t] for t in texts])

    def _ensemble(self, descriptions: Sequence[str]) -> torch.Tensor:
        import torch.nn.functional as F

        return F.normalize(self.embed_texts(descriptions).mean(dim=0), dim=-1)

    def tokens(self, text: str) -> int:
        """The tokenizer's token count of ``text`` (cached)."""
        if text not in self._tokens:
            self._tokens[text] = token_count(self.tokenizer, text)
        return self._tokens[text]

    # --- scores -------------------------------------------------------------------------------

    def score_pixels(
        self,
        pixels: torch.Tensor,
        prompts: Sequence[str],
        enhanced_prompts: Sequence[str | None] | None = None,
    ) -> list[dict[str, Any]]:
        """Scores of a batch of preprocessed images, each against its prompt(s)."""
        import torch

        self.load()
        images = self.embed_pixels(pixels)
        rows: list[dict[str, Any]] = [{} for _ in prompts]
        texts = {"": list(prompts)}
        if enhanced_prompts is not None:
            texts["_enhanced"] = [text or "" for text in enhanced_prompts]
        for suffix, batch_texts in texts.items():
            cosines = (images * self.embed_texts(batch_texts).to(images.device)).sum(dim=-1)
            scores = (TEMPERATURE * cosines).clamp(min=0).tolist()
            for row, text, score in zip(rows, batch_texts, scores, strict=True):
                tokens = self.tokens(text)
                row[f"clip_score{suffix}"] = score if text else None
                row[f"clip_tokens{suffix}"] = tokens if text else None
                row[f"clip_truncated{suffix}"] = tokens > self.context_length if text else None
        assert self._aspects is not None
        aspects = self._aspects.to(images.device)
        # [batch, aspect, side]: softmax over (positive, negative) per aspect.
        similarities = torch.einsum("bd,asd->bas", images, aspects)
        probabilities = (TEMPERATURE * similarities).softmax(dim=-1)[..., 0].tolist()
        laion = None
        if self.head is not None:
            with torch.inference_mode():
                laion = self.head(images.to(self.head.weight.device)).squeeze(-1).tolist()
        for index, row in enumerate(rows):
            row.update(zip(ASPECT_COLUMNS, probabilities[index], strict=True))
            row["laion_aesthetic"] = laion[index] if laion is not None else None
        return rows

    def score_images(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        enhanced_prompts: Sequence[str | None] | None = None,
    ) -> list[dict[str, Any]]:
        """Scores of ``images``, ``batch_size`` at a time (see :meth:`score_pixels`)."""
        import torch

        self.load()
        rows: list[dict[str, Any]] = []
        size = self.config.batch_size
        for start in range(0, len(images), size):
            pixels = torch.stack(
                [self.preprocess(image.convert("RGB")) for image in images[start : start + size]]
            )
            enhanced = enhanced_prompts[start : start + size] if enhanced_prompts else None
            rows += self.score_pixels(pixels, prompts[start : start + size], enhanced)
        return rows

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """CLIPScore of each image against its prompt (``scoring.preference``'s interface)."""
        return [row["clip_score"] for row in self.score_images(images, prompts)]

    def score_video_clip(
        self, source: Image.Image, frames: Sequence[Image.Image]
    ) -> dict[str, Any]:
        """How close a video clip's frames stay to the source image and to each other."""
        if not frames:
            raise ValueError("a video clip without frames cannot be scored")
        embeddings = self.embed_images([source, *frames])
        source_embedding, frame_embeddings = embeddings[0], embeddings[1:]
        to_source = frame_embeddings @ source_embedding
        consecutive = (frame_embeddings[1:] * frame_embeddings[:-1]).sum(dim=-1)
        return {
            "source_similarity": float(to_source.mean()),
            "source_similarity_min": float(to_source.min()),
            "temporal_consistency": float(consecutive.mean()) if len(consecutive) else None,
            "temporal_consistency_min": float(consecutive.min()) if len(consecutive) else None,
            "scored_frames": len(frames),
        }
