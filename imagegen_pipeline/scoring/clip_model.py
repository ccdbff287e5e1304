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

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from imagegen_pipeline.model_settings import HF_HUB, LOCAL_DIR, ClipModelSettings
from imagegen_pipeline.model_weights import ModelWeightsMissingError
from imagegen_pipeline.registry import CLIP_MODEL
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


OPEN_CLIP_DEFAULT: tuple[str, str] = CLIP_MODEL.weights.open_clip_tag  # type: ignore[assignment,union-attr]


def _cached_tag_file(tag_config: dict[str, Any]) -> str | None:
    """The local file of an open_clip pretrained tag, if it was pulled; never downloads."""
    from huggingface_hub import try_to_load_from_cache

    hub = tag_config.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors"]
        names += [] if filename else ["open_clip_pytorch_model.bin"]
        for name in names:
            found = try_to_load_from_cache(repo_id, name)
            if isinstance(found, str):
                return found
    url = tag_config.get("url", "")
    if url:  # open_clip's own download folder for URL-only tags
        local = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if local.is_file():
            return str(local)
    return None


def _missing(model: str, pretrained: str | None, repo_id: str | None) -> ModelWeightsMissingError:
    what = f"{model}/{pretrained}" if pretrained else model
    pull = CLIP_MODEL.name if (model, pretrained) == OPEN_CLIP_DEFAULT else (repo_id or model)
    return ModelWeightsMissingError(
        f"open_clip weights {what!r} are not on this machine. Run `imagegen models pull {pull}` "
        "on a machine that can reach the Hugging Face Hub (copy its HF_HOME cache here if this "
        "machine is offline), or set the scorer's `checkpoint` to a local weights file or its "
        "`model` to a `local-dir:` folder. Steps never download unless allow_download is set."
    )


def open_clip_source(config: ClipModelSettings) -> tuple[str, dict[str, Any]]:
    """The open_clip model name and loader arguments for ``config``, from local files only."""
    import open_clip

    model = config.model
    folder = Path(model.removeprefix(LOCAL_DIR)).expanduser()
    if model.startswith(LOCAL_DIR) or folder.is_dir():
        if not (folder / "open_clip_config.json").is_file():
            raise ModelWeightsMissingError(
                f"open_clip folder {str(folder)!r} is missing or has no open_clip_config.json."
            )
        return f"{LOCAL_DIR}{folder}", {}
    if model.startswith(HF_HUB):
        from huggingface_hub import try_to_load_from_cache

        repo_id = model.removeprefix(HF_HUB)
        cached = try_to_load_from_cache(repo_id, "open_clip_config.json")
        if not config.allow_download and not isinstance(cached, str):
            raise _missing(model, None, repo_id)
        return model, {}
    if model not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model!r}; see open_clip.list_models()")

    pretrained = config.pretrained
    tag_config = open_clip.get_pretrained_cfg(model, pretrained) if pretrained else {}
    checkpoint = config.checkpoint
    if pretrained and not tag_config:
        if not Path(pretrained).expanduser().is_file():
            tags = open_clip.list_pretrained_tags_by_model(model)
            raise ValueError(f"unknown pretrained tag {pretrained!r} for {model}; known: {tags}")
        checkpoint = checkpoint or pretrained  # a weights file given as `pretrained`
    quick_gelu = config.quick_gelu
    if quick_gelu is None:
        quick_gelu = bool(tag_config.get("quick_gelu", False))
    # The tag's preprocessing (mean, std, resize) also applies to its weights loaded from a file.
    kwargs: dict[str, Any] = {"force_quick_gelu": quick_gelu}
    for key, argument in [
        ("mean", "image_mean"),
        ("std", "image_std"),
        ("interpolation", "image_interpolation"),
        ("resize_mode", "image_resize_mode"),
    ]:
        if key in tag_config:
            kwargs[argument] = tag_config[key]
    checkpoint = checkpoint or (_cached_tag_file(tag_config) if tag_config else None)
    if checkpoint is None:
        if tag_config and config.allow_download:
            return model, {**kwargs, "pretrained": pretrained}
        repo_id = tag_config.get("hf_hub", "").rstrip("/") or None
        raise _missing(model, pretrained, repo_id)
    if not Path(checkpoint).expanduser().is_file():
        raise ModelWeightsMissingError(f"open_clip checkpoint file {checkpoint!r} does not exist.")
    return model, {**kwargs, "pretrained": str(Path(checkpoint).expanduser())}


def load_aesthetic_head(path: str | Path, embed_dim: int) -> torch.nn.Linear:
    """The LAION linear aesthetic head (``Linear(embed_dim, 1)``) from a weights file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelWeightsMissingError(f"aesthetic head file {str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    weights = [v for v in state.values() if isinstance(v, torch.Tensor) and v.ndim == 2]
    biases = [v for v in state.values() if isinstance(v, torch.Tensor) and v.ndim == 1]
    if len(weights) != 1 or len(biases) != 1 or tuple(weights[0].shape) != (1, embed_dim):
        shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
        raise ValueError(
            f"{path} is not a linear aesthetic head Linear({embed_dim}, 1) for this model "
            f"(tensors {shapes}); the LAION MLP predictor is not supported."
        )
    head = torch.nn.Linear(embed_dim, 1)
    head.load_state_dict({"weight": weights[0].float(), "bias": biases[0].float()})
    return head.eval()


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
    def context_length(self) -> int:
        """Tokens the text tower reads; longer prompts are truncated."""
        return int(getattr(self.tokenizer, "context_length", 77))

    def load(self) -> float:
        """Load model, tokenizer, optional head and the descriptions' embeddings (once)."""
        if self.model is not None:
            return 0.0
        import open_clip

        started = time.perf_counter()
        name, kwargs = open_clip_source(self.config)
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

    # --- embeddings ---------------------------------------------------------------------------

    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 embeddings of a batch of preprocessed images."""
        dtype = next(self.model.parameters()).dtype
        with torch.inference_mode():
            features = self.model.encode_image(pixels.to(self.device, dtype=dtype))
        return F.normalize(features.float(), dim=-1)

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised embeddings of ``images``, ``batch_size`` at a time."""
        self.load()
        chunks = []
        for start in range(0, len(images), self.config.batch_size):
            batch = images[start : start + self.config.batch_size]
            pixels = torch.stack([self.preprocess(image.convert("RGB")) for image in batch])
            chunks.append(self.embed_pixels(pixels))
        return torch.cat(chunks) if chunks else torch.empty(0, 0)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised embeddings of ``texts``; each distinct text is encoded once per step."""
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
