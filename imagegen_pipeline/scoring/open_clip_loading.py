"""Loading open_clip models from local files only: folders, hub caches, tags, checkpoints.

Scorers built on open_clip share this: steps never download, and a missing file is one clear
error naming what to pull. Imports open_clip and torch inside the functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imagegen_pipeline.model_settings import HF_HUB, LOCAL_DIR
from imagegen_pipeline.model_weights import ModelWeightsMissingError

if TYPE_CHECKING:
    import torch


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


def _missing(
    model: str, pretrained: str | None, repo_id: str | None, pull: str | None
) -> ModelWeightsMissingError:
    what = f"{model}/{pretrained}" if pretrained else model
    pull = pull or repo_id or model
    return ModelWeightsMissingError(
        f"open_clip weights {what!r} are not on this machine. Run `imagegen models pull {pull}` "
        "on a machine that can reach the Hugging Face Hub (copy its HF_HOME cache here if this "
        "machine is offline), or set the scorer's `checkpoint` to a local weights file or its "
        "`model` to a `local-dir:` folder. Steps never download unless allow_download is set."
    )


def open_clip_source(
    config: Any, pulled_as: dict[tuple[str, str], str] | None = None
) -> tuple[str, dict[str, Any]]:
    """The open_clip model name and loader arguments for ``config`` (a scorer's settings: model,
    pretrained, checkpoint, quick_gelu, allow_download), from local files only. ``pulled_as``
    names the ``imagegen models pull`` argument of known (model, tag) pairs for the error."""
    pulled_as = pulled_as or {}
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
            raise _missing(model, None, repo_id, None)
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
        raise _missing(model, pretrained, repo_id, pulled_as.get((model, pretrained or "")))
    if not Path(checkpoint).expanduser().is_file():
        raise ModelWeightsMissingError(f"open_clip checkpoint file {checkpoint!r} does not exist.")
    return model, {**kwargs, "pretrained": str(Path(checkpoint).expanduser())}


def load_aesthetic_head(path: str | Path, embed_dim: int) -> torch.nn.Linear:
    """The LAION linear aesthetic head (``Linear(embed_dim, 1)``) from a weights file."""
    import torch

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
