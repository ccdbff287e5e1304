"""imagegen.toml, then the environment: one configuration for every entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagegen_pipeline.project_config import (
    CONFIG_ENV_VAR,
    ENV_PREFIX,
    ConfigError,
    ProjectConfig,
    config_file,
    load_project_config,
)
from imagegen_pipeline.registry import BACKEND_NAMES, MODELS, configured_backends

# Every variable the configuration reads: IMAGEGEN_<setting> (and the storage's older name).
ENVIRONMENT = [f"{ENV_PREFIX}{name.upper()}" for name in ProjectConfig.model_fields] + [
    "IMAGEGEN_STORAGE_DIR"
]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No configuration variables, and a working directory without imagegen.toml."""
    for variable in [CONFIG_ENV_VAR, *ENVIRONMENT]:
        monkeypatch.delenv(variable, raising=False)
    for spec in MODELS.values():
        if spec.model_env_var:
            monkeypatch.delenv(spec.model_env_var, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def test_defaults_without_a_file() -> None:
    assert config_file() is None
    config = load_project_config()
    assert config == ProjectConfig()
    assert config.storage == "storage"
    assert config.device == "auto"
    # No list in the file: every registered backend (a new one needs no line here).
    assert config.backends is None
    assert configured_backends(config) == list(BACKEND_NAMES)
    assert BACKEND_NAMES == ("flux_schnell", "sdxl_turbo", "gemini")
    assert config.model_for(MODELS["flux_schnell"]) == "auto"


def test_imagegen_toml_in_the_working_directory(clean_environment: Path) -> None:
    (clean_environment / "imagegen.toml").write_text(
        'storage = "/data/out"\n'
        'device = "cpu"\n'
        'backends = ["sdxl_turbo"]\n'
        "sensor_interval_seconds = 5\n"
        "[models]\n"
        'flux_schnell = "/models/flux"\n'
    )
    assert config_file() == Path("imagegen.toml")
    config = load_project_config()
    assert config.storage == "/data/out"
    assert config.device == "cpu"
    assert config.backends == ("sdxl_turbo",)
    assert config.sensor_interval_seconds == 5
    # Untouched keys keep their defaults, relative to the file's folder like every path in it.
    assert config.prompts_dir == str(clean_environment.resolve() / "prompts")
    assert config.model_for(MODELS["flux_schnell"]) == "/models/flux"
    assert config.model_for(MODELS["sdxl_turbo"]) == "auto"


def test_imagegen_config_variable_names_the_file(
    clean_environment: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (clean_environment / "imagegen.toml").write_text('device = "cuda"\n')
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text('device = "cuda:1"\n')
    monkeypatch.setenv(CONFIG_ENV_VAR, str(elsewhere))
    assert config_file() == elsewhere
    assert load_project_config().device == "cuda:1"

    monkeypatch.setenv(CONFIG_ENV_VAR, str(tmp_path / "missing.toml"))
    assert config_file() is None
    assert load_project_config().device == "auto"


def test_environment_wins_over_the_file(
    clean_environment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (clean_environment / "imagegen.toml").write_text(
        'storage = "from-file"\ndevice = "cpu"\nbackends = ["gemini"]\n'
        '[models]\nflux_schnell = "/file/flux"\n'
    )
    monkeypatch.setenv("IMAGEGEN_STORAGE", "s3://bucket/prefix")
    monkeypatch.setenv("IMAGEGEN_BACKENDS", "flux_schnell, sdxl_turbo")
    monkeypatch.setenv("IMAGEGEN_SENSOR_INTERVAL_SECONDS", "7")
    monkeypatch.setenv("IMAGEGEN_EXECUTOR", "multiprocess")
    monkeypatch.setenv("IMAGEGEN_FLUX_SCHNELL_MODEL", "/env/flux")
    config = load_project_config()
    assert config.storage == "s3://bucket/prefix"
    assert config.backends == ("flux_schnell", "sdxl_turbo")
    assert config.sensor_interval_seconds == 7
    assert config.executor == "multiprocess"
    assert config.device == "cpu"  # not overridden: the file's value
    assert config.model_for(MODELS["flux_schnell"]) == "/env/flux"


def test_older_storage_variable_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_STORAGE_DIR", "/old/name")
    assert load_project_config().storage == "/old/name"


def test_empty_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_DEVICE", "")
    monkeypatch.setenv("IMAGEGEN_FLUX_SCHNELL_MODEL", "")
    config = load_project_config()
    assert config.device == "auto"
    assert config.model_for(MODELS["flux_schnell"]) == "auto"


def test_unknown_keys_are_named(clean_environment: Path) -> None:
    (clean_environment / "imagegen.toml").write_text(
        'storage = "x"\nstorag_dir = "typo"\nbogus = 1\n'
    )
    with pytest.raises(
        ConfigError, match=r"unknown setting storag_dir; unknown setting bogus"
    ) as error:
        load_project_config()
    assert "imagegen.toml" in str(error.value)


def test_unknown_backends_in_the_file_are_named(clean_environment: Path) -> None:
    (clean_environment / "imagegen.toml").write_text('backends = ["flux_schnell", "dalle"]\n')
    with pytest.raises(ValueError, match=r"unknown backend\(s\) dalle"):
        configured_backends(load_project_config())


def test_unknown_backends_in_the_environment_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_BACKENDS", "midjourney flux_schnell dalle")
    with pytest.raises(ValueError, match=r"unknown backend\(s\) dalle, midjourney"):
        configured_backends(load_project_config())


def test_tiny_models_dir_of_a_local_storage() -> None:
    assert ProjectConfig(storage="out").tiny_models_dir == Path("out/models/tiny")
    assert ProjectConfig(storage="/srv/imagegen").tiny_models_dir == Path(
        "/srv/imagegen/models/tiny"
    )


def test_tiny_models_dir_of_a_url_storage(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = ProjectConfig(storage="s3://bucket/prefix")
    assert config.tiny_models_dir == tmp_path / "home" / ".cache/imagegen/models/tiny"


def test_tiny_models_dir_of_an_explicit_models_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ProjectConfig(models_dir="/models").tiny_models_dir == Path("/models/tiny")
    assert ProjectConfig(storage="s3://b/p", models_dir="~/m").tiny_models_dir == (
        tmp_path / "home" / "m" / "tiny"
    )


def test_models_dir_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_MODELS_DIR", "/fast/disk")
    assert load_project_config().tiny_models_dir == Path("/fast/disk/tiny")


def test_bad_values_name_the_key_and_the_file(clean_environment: Path) -> None:
    (clean_environment / "imagegen.toml").write_text('sensor_interval_seconds = "often"\n')
    with pytest.raises(ConfigError, match=r"imagegen.toml: sensor_interval_seconds") as error:
        load_project_config()
    assert "IMAGEGEN_SENSOR_INTERVAL_SECONDS" in str(error.value)
    (clean_environment / "imagegen.toml").write_text('executor = "slurm"\n')
    with pytest.raises(ConfigError, match=r"executor .*'in_process'"):
        load_project_config()


def test_every_setting_has_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_MODEL_CACHE_GB", "12.5")
    monkeypatch.setenv("IMAGEGEN_CELERY_BROKER", "redis://queue:6379/1")
    monkeypatch.setenv("IMAGEGEN_EXECUTOR", "celery")
    config = load_project_config()
    assert (config.model_cache_gb, config.celery_broker, config.executor) == (
        12.5,
        "redis://queue:6379/1",
        "celery",
    )
