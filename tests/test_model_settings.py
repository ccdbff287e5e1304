"""Settings declared once: the Dagster resources are the settings classes, and run config
that sets one field leaves every other at its class default (resolved when a step starts)."""

from __future__ import annotations

from typing import Any

import dagster as dg
import pydantic
import pytest

from imagegen_pipeline.backends.flux_schnell import FluxSchnellSettings
from imagegen_pipeline.backends.gemini.settings import GeminiSettings
from imagegen_pipeline.defs.model_resources import settings_of, settings_resource
from imagegen_pipeline.defs.resources import default_resources
from imagegen_pipeline.model_settings import ModelSettings
from imagegen_pipeline.registry import MODELS


@pytest.mark.parametrize("name", sorted(MODELS))
def test_resource_has_exactly_the_settings_fields(name: str) -> None:
    settings = MODELS[name].settings
    resource = settings_resource(settings)
    assert issubclass(resource, dg.ConfigurableResource)
    assert issubclass(resource, settings)
    assert resource is settings_resource(settings)  # built once per class

    expected = settings.model_fields
    actual = resource.model_fields
    assert list(actual) == list(expected)
    for field, info in expected.items():
        mine = actual[field]
        assert (mine.annotation, mine.default, mine.description, mine.repr) == (
            info.annotation,
            info.default,
            info.description,
            info.repr,
        ), field


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dagster_config_schema_matches_the_settings(name: str) -> None:
    settings = MODELS[name].settings
    config_fields = settings_resource(settings).to_config_schema().as_field().config_type.fields
    assert list(config_fields) == list(settings.model_fields)
    for field, info in settings.model_fields.items():
        assert not config_fields[field].is_required, field
        assert config_fields[field].description == info.description
        if info.default is not None:
            assert config_fields[field].default_value == info.default, field


@pytest.mark.parametrize("name", sorted(MODELS))
def test_default_resources_hold_only_class_defaults(name: str) -> None:
    settings = MODELS[name].settings
    resource = default_resources()[name]
    assert isinstance(resource, settings_resource(settings))
    assert settings_of(resource, settings) == settings()


def test_settings_are_frozen_and_strict() -> None:
    settings = FluxSchnellSettings()
    with pytest.raises(pydantic.ValidationError):
        settings.width = 5  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="widht"):
        FluxSchnellSettings(widht=5)  # type: ignore[call-arg]
    with pytest.raises(pydantic.ValidationError):
        FluxSchnellSettings(dtype="int8")  # type: ignore[arg-type]
    assert FluxSchnellSettings().model == "auto"
    assert issubclass(FluxSchnellSettings, ModelSettings)


def test_gemini_key_is_kept_out_of_repr() -> None:
    settings = GeminiSettings(api_key="sk-secret-value")
    assert "sk-secret-value" not in repr(settings)
    resource = settings_resource(GeminiSettings)(api_key="sk-secret-value")
    assert "sk-secret-value" not in repr(resource)


FLUX_FIELDS = list(FluxSchnellSettings.model_fields)
GEMINI_FIELDS = list(GeminiSettings.model_fields)
FluxResource = settings_resource(FluxSchnellSettings)
GeminiResource = settings_resource(GeminiSettings)


def run_probe(run_config: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """What an asset sees of the project's flux_schnell and gemini resources in one run."""
    seen: dict[str, dict[str, Any]] = {}

    @dg.asset
    def probe(flux_schnell: FluxResource, gemini: GeminiResource) -> None:  # type: ignore[valid-type]
        seen["flux_schnell"] = {f: getattr(flux_schnell, f) for f in FLUX_FIELDS}
        seen["gemini"] = {f: getattr(gemini, f) for f in GEMINI_FIELDS}

    resources = default_resources()
    defs = dg.Definitions(
        assets=[probe],
        jobs=[dg.define_asset_job("probe_job", [probe])],
        resources={"flux_schnell": resources["flux_schnell"], "gemini": resources["gemini"]},
    )
    result = defs.resolve_job_def("probe_job").execute_in_process(run_config=run_config)
    assert result.success
    return seen


def test_run_config_of_one_field_leaves_the_others_at_their_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A key in the environment must not be read into the resource: only when a step starts.
    monkeypatch.setenv("GEMINI_API_KEY", "sk-from-the-environment")
    unconfigured = run_probe(None)
    configured = run_probe(
        {
            "resources": {
                "flux_schnell": {"config": {"width": 320}},
                "gemini": {"config": {"max_attempts": 3}},
            }
        }
    )

    flux_defaults = FluxSchnellSettings().model_dump()
    gemini_defaults = GeminiSettings().model_dump()
    assert unconfigured == {"flux_schnell": flux_defaults, "gemini": gemini_defaults}
    assert configured["flux_schnell"] == {**flux_defaults, "width": 320}
    assert configured["gemini"] == {**gemini_defaults, "max_attempts": 3}
    # In particular:
    assert configured["flux_schnell"]["model"] == "auto"
    assert configured["flux_schnell"]["height"] is None
    assert configured["flux_schnell"]["steps"] == 4
    assert configured["gemini"]["api_key"] is None
    assert unconfigured["gemini"]["api_key"] is None
