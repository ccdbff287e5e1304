"""What "auto" and None become: real weights when cached, else tiny stand-ins, and their sizes."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest

from imagegen_pipeline.backends.flux_schnell import FluxSchnellSettings
from imagegen_pipeline.backends.gemini.settings import GeminiSettings
from imagegen_pipeline.model_resolution import (
    LOCAL_DIR,
    resolve_model,
    resolve_settings,
    warm_model,
    weights_present,
)
from imagegen_pipeline.project_config import ProjectConfig
from imagegen_pipeline.registry import MODELS
from imagegen_pipeline.scoring.clip_model import ClipModelSettings
from imagegen_pipeline.tiny_models import is_tiny_model
from imagegen_pipeline.video.svd import SvdSettings

FLUX = MODELS["flux_schnell"]
SVD = MODELS["svd"]
CLIP = MODELS["clip_model"]
GEMINI = MODELS["gemini"]
FLUX_REPO = "black-forest-labs/FLUX.1-schnell"


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, and no model variables: "auto" finds no real weights."""
    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    for spec in MODELS.values():
        if spec.model_env_var:
            monkeypatch.delenv(spec.model_env_var, raising=False)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    return cache


def cache_file(cache: Path, repo_id: str, filename: str) -> None:
    """A file of ``repo_id`` at ``main`` in the Hugging Face cache layout."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (repo / "snapshots" / commit / filename).write_text("{}")


def project(tmp_path: Path, name: str = "a", **values: object) -> ProjectConfig:
    return ProjectConfig(
        storage=str(tmp_path / "storage"),
        models_dir=str(tmp_path / name),
        device="cpu",
        **values,  # type: ignore[arg-type]
    )


# --- resolve_model --------------------------------------------------------------------------


def test_explicit_tiny_folder_is_detected(tiny_flux: Path, tmp_path: Path) -> None:
    resolved = resolve_model(FLUX, str(tiny_flux), project(tmp_path))
    assert resolved.model == str(tiny_flux)
    assert resolved.model_id == str(tiny_flux)
    assert resolved.is_tiny
    assert resolved.notice == ""


def test_explicit_real_folder_and_repo_id(tmp_path: Path) -> None:
    real = tmp_path / "my-flux"
    real.mkdir()
    (real / "model_index.json").write_text("{}")
    resolved = resolve_model(FLUX, str(real), project(tmp_path))
    assert (resolved.model, resolved.is_tiny) == (str(real), False)

    repo = resolve_model(FLUX, "someone/flux-finetune", project(tmp_path))
    assert (repo.model, repo.model_id, repo.is_tiny) == (
        "someone/flux-finetune",
        "someone/flux-finetune",
        False,
    )
    assert not (tmp_path / "a").exists()  # nothing was built


def test_explicit_tiny_clip_folder_gets_the_local_dir_prefix(
    tiny_open_clip: Path, tmp_path: Path
) -> None:
    bare = resolve_model(CLIP, str(tiny_open_clip), project(tmp_path))
    prefixed = resolve_model(CLIP, f"{LOCAL_DIR}{tiny_open_clip}", project(tmp_path))
    assert bare.model == prefixed.model == f"local-dir:{tiny_open_clip}"
    assert bare.is_tiny and prefixed.is_tiny


def test_auto_takes_the_variable_then_the_file(
    tiny_flux: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_file = project(tmp_path, models={"flux_schnell": str(tiny_flux)})
    resolved = resolve_model(FLUX, "auto", from_file)
    assert (resolved.model, resolved.is_tiny) == (str(tiny_flux), True)

    monkeypatch.setenv("IMAGEGEN_FLUX_SCHNELL_MODEL", "someone/other-flux")
    resolved = resolve_model(FLUX, "auto", from_file)
    assert (resolved.model, resolved.is_tiny) == ("someone/other-flux", False)
    assert not (tmp_path / "a").exists()


def test_auto_without_real_weights_builds_the_tiny_model(tmp_path: Path) -> None:
    first_project = project(tmp_path, "a")
    first = resolve_model(FLUX, "auto", first_project)
    second = resolve_model(FLUX, "auto", project(tmp_path, "b"))

    folder = tmp_path / "a" / "tiny" / "FLUX.1-schnell"
    assert first_project.tiny_models_dir == tmp_path / "a" / "tiny"
    assert first.model == str(folder)
    assert is_tiny_model(folder)
    assert (folder / "model_index.json").is_file()
    assert first.is_tiny
    assert "flux_schnell" in first.notice
    assert "`imagegen models pull flux_schnell`" in first.notice
    assert "TINY RANDOM-WEIGHT" in first.notice
    assert FLUX_REPO in first.notice
    # The id names what it stands in for, not where it was built.
    assert second.model == str(tmp_path / "b" / "tiny" / "FLUX.1-schnell")
    assert first.model_id == second.model_id == f"tiny-random/{FLUX_REPO}"


def test_auto_tiny_clip_is_a_local_dir(tmp_path: Path) -> None:
    resolved = resolve_model(CLIP, "auto", project(tmp_path))
    assert resolved.model == f"local-dir:{tmp_path / 'a' / 'tiny' / 'ViT-L-14'}"
    assert resolved.model_id == "tiny-random/ViT-L-14"


def test_auto_with_real_weights_in_the_cache(empty_hub_cache: Path, tmp_path: Path) -> None:
    assert not weights_present(FLUX)
    cache_file(empty_hub_cache, FLUX_REPO, "model_index.json")
    assert weights_present(FLUX)

    resolved = resolve_model(FLUX, "auto", project(tmp_path))
    assert (resolved.model, resolved.model_id, resolved.is_tiny) == (FLUX_REPO, FLUX_REPO, False)
    assert resolved.notice == ""
    assert not (tmp_path / "a").exists()  # no tiny build


def test_open_clip_weights_are_found_by_their_own_file_names(empty_hub_cache: Path) -> None:
    assert not weights_present(CLIP)
    cache_file(empty_hub_cache, "timm/vit_large_patch14_clip_224.openai", "model_index.json")
    assert not weights_present(CLIP)  # a diffusers index is not open_clip's checkpoint
    cache_file(
        empty_hub_cache, "timm/vit_large_patch14_clip_224.openai", "open_clip_model.safetensors"
    )
    assert weights_present(CLIP)
    assert weights_present(GEMINI)  # hosted: nothing to download


# --- resolve_settings -----------------------------------------------------------------------


def test_real_weights_take_the_model_card_sizes(empty_hub_cache: Path, tmp_path: Path) -> None:
    cache_file(empty_hub_cache, FLUX_REPO, "model_index.json")
    settings, resolved = resolve_settings(FLUX, FluxSchnellSettings(), project(tmp_path))
    assert isinstance(settings, FluxSchnellSettings)
    assert (settings.model, settings.width, settings.height) == (FLUX_REPO, 1024, 1024)
    assert settings.device == "cpu"
    assert resolved is not None and not resolved.is_tiny


def test_tiny_weights_take_the_tiny_sizes(tmp_path: Path) -> None:
    settings, resolved = resolve_settings(FLUX, FluxSchnellSettings(), project(tmp_path))
    assert (settings.width, settings.height) == (256, 256)
    assert settings.model == str(tmp_path / "a" / "tiny" / "FLUX.1-schnell")
    assert resolved is not None and resolved.is_tiny
    # The step and the CLI log this line; it tells the user how to get the real weights.
    assert "TINY RANDOM-WEIGHT" in resolved.notice
    assert "imagegen models pull flux_schnell" in resolved.notice


def test_values_set_are_kept(tiny_flux: Path, tmp_path: Path) -> None:
    chosen = FluxSchnellSettings(model=str(tiny_flux), width=320, device="cuda:1", steps=2)
    settings, _ = resolve_settings(FLUX, chosen, project(tmp_path))
    assert (settings.width, settings.height) == (320, 256)  # only the None one is filled
    assert settings.device == "cuda:1"
    assert settings.steps == 2


def test_svd_defaults_real_and_tiny(empty_hub_cache: Path, tiny_svd: Path, tmp_path: Path) -> None:
    tiny, _ = resolve_settings(SVD, SvdSettings(model=str(tiny_svd)), project(tmp_path))
    assert (tiny.width, tiny.height, tiny.num_frames, tiny.steps) == (64, 64, 4, 2)
    assert (tiny.decode_chunk_size, tiny.max_guidance_scale) == (4, 1.0)

    cache_file(empty_hub_cache, "stabilityai/stable-video-diffusion-img2vid-xt", "model_index.json")
    real, resolved = resolve_settings(SVD, SvdSettings(), project(tmp_path))
    assert real.model == "stabilityai/stable-video-diffusion-img2vid-xt"
    assert (real.width, real.height, real.num_frames, real.steps) == (1024, 576, 25, 25)
    assert (real.decode_chunk_size, real.max_guidance_scale) == (8, 3.0)
    assert resolved is not None and not resolved.is_tiny


def test_device_auto_takes_the_project_device(tiny_open_clip: Path, tmp_path: Path) -> None:
    settings, _ = resolve_settings(
        CLIP, ClipModelSettings(model=str(tiny_open_clip)), project(tmp_path)
    )
    assert settings.device == "cpu"
    gpu_project = ProjectConfig(device="cuda:3", models_dir=str(tmp_path))
    settings, _ = resolve_settings(CLIP, ClipModelSettings(model=str(tiny_open_clip)), gpu_project)
    assert settings.device == "cuda:3"


def test_gemini_key_from_the_environment_stays_out_of_repr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", "  sk-from-env-1234  ")
    settings, resolved = resolve_settings(GEMINI, GeminiSettings(), project(tmp_path))
    assert resolved is None  # a hosted model is named, not resolved
    assert settings.api_key == "sk-from-env-1234"
    assert settings.model == "gemini-2.5-flash-image"
    assert "sk-from-env-1234" not in repr(settings)
    assert "sk-from-env-1234" not in str(settings)

    explicit, _ = resolve_settings(GEMINI, GeminiSettings(api_key="sk-set"), project(tmp_path))
    assert explicit.api_key == "sk-set"

    monkeypatch.setenv("GEMINI_API_KEY", "   ")
    blank, _ = resolve_settings(GEMINI, GeminiSettings(), project(tmp_path))
    assert blank.api_key is None


# --- warm_model -----------------------------------------------------------------------------


def test_warm_model_is_reused_until_the_settings_change(tiny_flux: Path, tmp_path: Path) -> None:
    config = project(tmp_path)
    settings = FluxSchnellSettings(model=str(tiny_flux), width=64, height=64)
    first = warm_model(FLUX, settings, config)
    again = warm_model(FLUX, FluxSchnellSettings(model=str(tiny_flux), width=64, height=64), config)
    # Nothing is created before a step asks for the model.
    assert (first.created, first.cache_hit, first.device) == (False, None, None)
    assert first.model is again.model  # first asks first
    assert first.cache_hit is False
    assert again.cache_hit is True
    assert first.device == "cpu"
    assert first.model.model_id == str(tiny_flux)
    assert first.settings.device == "cpu"

    changed = warm_model(FLUX, settings.model_copy(update={"width": 128}), config)
    assert changed.model is not first.model
    assert changed.cache_hit is False
    assert changed.model.config.width == 128


def test_warm_tiny_model_records_the_stand_in_id(tmp_path: Path) -> None:
    warm = warm_model(FLUX, FluxSchnellSettings(), project(tmp_path))
    assert warm.resolved is not None and warm.resolved.is_tiny
    assert warm.model.model_id == f"tiny-random/{FLUX_REPO}"
    assert warm.model.config.width == 256


def test_warm_gemini_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", "sk-warm")
    first = warm_model(GEMINI, GeminiSettings(), project(tmp_path))
    again = warm_model(GEMINI, GeminiSettings(), project(tmp_path))
    assert first.resolved is None
    assert first.model is again.model  # first asks first
    assert (first.cache_hit, again.cache_hit) == (False, True)
    other = warm_model(GEMINI, GeminiSettings(max_attempts=2), project(tmp_path))
    assert other.model is not first.model and other.cache_hit is False
