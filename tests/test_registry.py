"""The model registry: one table every part of the pipeline reads."""

from __future__ import annotations

import pytest

from imagegen_pipeline.backends.base import ImageBackend
from imagegen_pipeline.defs.partitions import backend_partitions
from imagegen_pipeline.model_settings import ModelSettings
from imagegen_pipeline.registry import (
    BACKEND_NAMES,
    IMAGE_BACKENDS,
    LOCAL_BACKEND_NAMES,
    MODELS,
    backend_spec,
    enabled_backends,
    has_key,
    implementation_class,
)

IMAGE_NAMES = [spec.name for spec in IMAGE_BACKENDS]


def test_names() -> None:
    assert IMAGE_NAMES == ["flux_schnell", "sdxl_turbo", "gemini"]
    assert list(BACKEND_NAMES) == IMAGE_NAMES
    assert list(LOCAL_BACKEND_NAMES) == ["flux_schnell", "sdxl_turbo"]
    scorers = ["clip_model", "hpsv2", "pickscore", "imagereward", "vqascore"]
    assert sorted(MODELS) == sorted([*IMAGE_NAMES, "svd", *scorers])
    assert all(MODELS[name].name == name for name in MODELS)


def test_every_image_backend_is_a_partition_key() -> None:
    assert backend_partitions.get_partition_keys() == IMAGE_NAMES
    assert all(MODELS[name].role == "image" for name in IMAGE_NAMES)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_settings_fields_have_descriptions(name: str) -> None:
    fields = MODELS[name].settings.model_fields
    assert fields
    undescribed = [field for field, info in fields.items() if not (info.description or "").strip()]
    assert undescribed == []


@pytest.mark.parametrize("name", sorted(MODELS))
def test_local_models_have_weights_and_a_tiny_builder(name: str) -> None:
    spec = MODELS[name]
    if not spec.is_local:
        assert spec.weights is None and spec.tiny_builder is None
        return
    assert spec.weights is not None
    assert spec.weights.repo_id
    assert callable(spec.tiny_builder)
    assert spec.model_env_var and spec.model_env_var.startswith("IMAGEGEN_")
    assert spec.model_env_var.endswith("_MODEL")
    assert issubclass(spec.settings, ModelSettings)  # model, revision, device, allow_download
    assert "model" in spec.settings.model_fields
    # Defaults filled at run time must name real settings fields.
    assert set(spec.defaults) <= set(spec.settings.model_fields)
    assert set(spec.tiny_defaults) <= set(spec.settings.model_fields)
    assert set(spec.defaults) == set(spec.tiny_defaults)


def test_model_variables_are_distinct() -> None:
    variables = [spec.model_env_var for spec in MODELS.values() if spec.model_env_var]
    assert (
        len(variables) == len(set(variables)) == len(LOCAL_BACKEND_NAMES) + 6
    )  # svd and the 5 scorers


def test_tiny_builders_each_stand_in_for_one_model() -> None:
    builders = [spec.tiny_builder for spec in MODELS.values() if spec.tiny_builder]
    assert (
        len(builders) == len(set(builders)) == len(LOCAL_BACKEND_NAMES) + 6
    )  # svd and the 5 scorers
    # Each builder lives beside its model, in the module that declares the spec.
    assert all(
        spec.tiny_builder.__module__ == spec.implementation.partition(":")[0]
        for spec in MODELS.values()
        if spec.tiny_builder
    )


def test_hosted_backend_needs_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    gemini = MODELS["gemini"]
    assert (gemini.runs_on, gemini.key_env_var) == ("api", "GEMINI_API_KEY")
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    assert not has_key(gemini)
    assert has_key(MODELS["flux_schnell"])


def test_enabled_backends_respects_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    assert enabled_backends() == ["flux_schnell", "sdxl_turbo"]
    monkeypatch.setenv("GEMINI_API_KEY", "   ")
    assert enabled_backends() == ["flux_schnell", "sdxl_turbo"]
    monkeypatch.setenv("GEMINI_API_KEY", "sk-test")
    assert enabled_backends() == ["flux_schnell", "sdxl_turbo", "gemini"]
    # A selection keeps the registry's order and drops unknown names.
    assert enabled_backends(["gemini", "flux_schnell", "dalle"]) == ["flux_schnell", "gemini"]
    assert enabled_backends([]) == []
    monkeypatch.delenv("GEMINI_API_KEY")
    assert enabled_backends(("gemini",)) == []


def test_backend_spec() -> None:
    assert backend_spec("sdxl_turbo") is MODELS["sdxl_turbo"]
    with pytest.raises(KeyError, match="unknown image backend 'svd'; known: flux_schnell"):
        backend_spec("svd")


EXPECTED_CLASSES = {
    "flux_schnell": ("imagegen_pipeline.backends.flux_schnell", "FluxSchnellBackend"),
    "sdxl_turbo": ("imagegen_pipeline.backends.sdxl_turbo", "SdxlTurboBackend"),
    "gemini": ("imagegen_pipeline.backends.gemini.backend", "GeminiBackend"),
    "svd": ("imagegen_pipeline.video.svd", "SvdGenerator"),
    "clip_model": ("imagegen_pipeline.scoring.clip_model", "ClipModel"),
    "hpsv2": ("imagegen_pipeline.scoring.hpsv2", "Hpsv2Scorer"),
    "pickscore": ("imagegen_pipeline.scoring.pickscore", "PickScoreScorer"),
    "imagereward": ("imagegen_pipeline.scoring.imagereward", "ImageRewardScorer"),
    "vqascore": ("imagegen_pipeline.scoring.vqascore", "VqaScoreScorer"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_implementation_class_imports_the_right_class(name: str) -> None:
    cls = implementation_class(MODELS[name])
    assert (cls.__module__, cls.__name__) == EXPECTED_CLASSES[name]
    # What the warm-model cache calls on every model.
    assert callable(cls.unload) and callable(cls.weight_bytes)
    if MODELS[name].role == "image":
        assert issubclass(cls, ImageBackend)
        assert cls.spec is MODELS[name]  # the class reads its name and facts from its spec
