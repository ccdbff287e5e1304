"""Where model weights come from: the Hugging Face cache, a local folder, ``imagegen models pull``.

Pipeline steps never download: a 24 GB fetch in the middle of a GPU step would hold the GPU
for nothing. Weights are pulled once, ahead of time, on a machine that can reach the hub.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WeightSource:
    """A model repository and the files of it the pipeline loads."""

    repo_id: str
    allow_patterns: tuple[str, ...] | None = None
    ignore_patterns: tuple[str, ...] | None = None


# Only what from_pretrained reads: single-file checkpoints at the repo root duplicate the
# diffusers folders and would double the download.
WEIGHT_SOURCES = {
    "flux_schnell": WeightSource(
        "black-forest-labs/FLUX.1-schnell", ignore_patterns=("flux1-schnell.safetensors", "*.md")
    ),
    "sdxl_turbo": WeightSource(
        "stabilityai/sdxl-turbo",
        allow_patterns=("*.json", "*.txt", "tokenizer*/*", "*.fp16.safetensors"),
    ),
    "svd_xt": WeightSource(
        "stabilityai/stable-video-diffusion-img2vid-xt",
        allow_patterns=("*.json", "*.txt", "*.fp16.safetensors"),
    ),
}
OPEN_CLIP_DEFAULT = ("ViT-L-14", "openai")


class ModelWeightsMissingError(RuntimeError):
    """The weights of a model are not on this machine; the message says how to get them."""


def missing_weights_message(model: str, revision: str | None, detail: str = "") -> str:
    """One message naming the model and every way to make its weights available."""
    if model.startswith(("/", ".", "~")):
        text = f"Model folder {model!r} is missing or incomplete."
    else:
        text = (
            f"Weights for {model!r} (revision {revision or 'main'}) are not on this machine. "
            f"Run `imagegen models pull {model}` on a machine that can reach the Hugging Face Hub "
            "(HF_HOME chooses the cache folder; copy it here if this machine is offline), "
            "or set the backend's `model` to a local folder in the diffusers layout. "
            "Steps load with local_files_only, as if HF_HUB_OFFLINE=1, and never download."
        )
    first_line = detail.strip().splitlines()[0] if detail.strip() else ""
    return f"{text} ({first_line})" if first_line else text


def pull(name_or_repo: str, revision: str | None = None) -> str:
    """Download a model's weights into the Hugging Face cache; returns the local folder."""
    from huggingface_hub import snapshot_download

    if name_or_repo in ("open_clip", "ViT-L-14"):
        return _pull_open_clip(*OPEN_CLIP_DEFAULT)
    source = WEIGHT_SOURCES.get(name_or_repo) or next(
        (s for s in WEIGHT_SOURCES.values() if s.repo_id == name_or_repo),
        WeightSource(name_or_repo),
    )
    return snapshot_download(
        source.repo_id,
        revision=revision,
        allow_patterns=list(source.allow_patterns) if source.allow_patterns else None,
        ignore_patterns=list(source.ignore_patterns) if source.ignore_patterns else None,
    )


def _pull_open_clip(model_name: str, pretrained: str) -> str:
    import open_clip

    config = open_clip.get_pretrained_cfg(model_name, pretrained)
    return open_clip.download_pretrained(config)


def is_cached(repo_id: str, revision: str | None = None) -> bool:
    """True when ``repo_id``'s diffusers index is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "model_index.json", revision=revision)
    return isinstance(found, str)
