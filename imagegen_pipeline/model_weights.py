"""Where model weights come from: the Hugging Face cache, a local folder, ``imagegen models pull``.

Pipeline steps never download: a 24 GB fetch in the middle of a GPU step would hold the GPU
for nothing. Weights are pulled once, ahead of time, on a machine that can reach the hub.
"""

from __future__ import annotations

from imagegen_pipeline.model_spec import WeightSource


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
            "or set the model to a local folder in the diffusers layout. "
            "Steps load with local_files_only, as if HF_HUB_OFFLINE=1, and never download."
        )
    first_line = detail.strip().splitlines()[0] if detail.strip() else ""
    return f"{text} ({first_line})" if first_line else text


def pull(source: WeightSource, revision: str | None = None) -> str:
    """Download a model's weights into the Hugging Face cache; returns the local folder."""
    if source.open_clip_tag is not None:
        import open_clip

        return open_clip.download_pretrained(open_clip.get_pretrained_cfg(*source.open_clip_tag))
    from huggingface_hub import snapshot_download

    for companion in source.companions:
        pull(companion)
    return snapshot_download(
        source.repo_id,
        revision=revision,
        allow_patterns=list(source.allow_patterns) if source.allow_patterns else None,
        ignore_patterns=list(source.ignore_patterns) if source.ignore_patterns else None,
    )


def is_cached(
    repo_id: str, revision: str | None = None, index_file: str = "model_index.json"
) -> bool:
    """True when ``repo_id``'s index file (a diffusers repo's by default) is in the local
    Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, index_file, revision=revision)
    return isinstance(found, str)
