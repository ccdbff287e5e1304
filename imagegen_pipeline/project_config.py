"""The one place a user configures the project: ``imagegen.toml``, then the environment.

Every entry point (``make demo``, ``make ui`` / ``dagster dev``, the daemon's sensors and
schedule, backfills, the CLI and celery workers) reads the same file, so they resolve the same
models, device and folders. The file and the ``IMAGEGEN_*`` variables are read by
pydantic-settings into one validated ``ProjectConfig``: a variable wins over the file, the file
over the defaults below, and a bad value fails when read with the key and the file named. The
file is ``$IMAGEGEN_CONFIG`` if set, else ``imagegen.toml`` in the working directory. Relative
folders in the file (and the default ones) are relative to the file's folder, so every process
finds the same folders whatever its working directory; relative folders in the environment, to
the working directory. This is the only module that reads the environment, secrets included.
"""

from __future__ import annotations

import functools
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from imagegen_pipeline.model_spec import ModelSpec

CONFIG_ENV_VAR = "IMAGEGEN_CONFIG"
CONFIG_FILE = "imagegen.toml"
ENV_PREFIX = "IMAGEGEN_"
FOLDER_SETTINGS = ("prompts_dir", "storage", "models_dir")
Executor = Literal["in_process", "multiprocess", "celery", "k8s"]


class ConfigError(ValueError):
    """A setting of the project file or the environment that cannot be used."""


class ProjectConfig(BaseModel):
    """Folders, models, device, automation and executor settings of this project."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompts_dir: str = "prompts"  # the folder users drop prompt CSVs into
    # A folder or URL (s3://bucket/prefix) all outputs go under. IMAGEGEN_STORAGE_DIR is the
    # older name of the variable.
    storage: str = Field(
        "storage",
        validation_alias=AliasChoices("storage", "IMAGEGEN_STORAGE", "IMAGEGEN_STORAGE_DIR"),
    )
    models_dir: str = ""  # where tiny models are built; "" = <storage>/models, or a cache dir
    device: str = "auto"  # "auto" (CUDA when present, else the CPU), "cpu", "cuda", "cuda:1"
    # Backends the sensors and schedule run; None: every registered backend.
    backends: Annotated[tuple[str, ...] | None, NoDecode] = None
    models: dict[str, str] = Field(default_factory=dict)  # per model: "auto", repo or folder
    sensor_interval_seconds: int = Field(30, ge=1)  # how often the prompts folder is looked at
    # Rejects are replaced once reviewers pause this long, so one burst of verdicts is one run.
    review_pause_seconds: int = Field(15, ge=0)
    bulk_cron: str = "0 2 * * *"  # when the bulk-generation schedule ticks (if turned on)
    executor: Executor = "in_process"  # see README, "Outgrowing one machine"
    model_cache_gb: float | None = None  # warm models kept per process; None: 90 % of the GPU
    celery_broker: str = "redis://127.0.0.1:6379/0"  # with executor = "celery"
    celery_backend: str | None = None  # celery results; None: the broker
    metadata_spare_dir: str = ""  # run-metadata rows a full disk refused; "" = $TMPDIR

    @field_validator("backends", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        # IMAGEGEN_BACKENDS="flux_schnell sdxl_turbo" (spaces or commas), or a TOML list.
        if isinstance(value, str):
            return tuple(part for part in value.replace(",", " ").split())
        return value

    @property
    def tiny_models_dir(self) -> Path:
        """The local folder tiny random-weight models are built in."""
        if self.models_dir:
            return Path(self.models_dir).expanduser() / "tiny"
        if "://" in self.storage:  # models must be on a local disk to load
            return Path("~/.cache/imagegen/models/tiny").expanduser()
        return Path(self.storage) / "models" / "tiny"

    def model_for(self, spec: ModelSpec) -> str:
        """What "auto" means for ``spec`` here: its IMAGEGEN_*_MODEL variable, the file's
        ``[models]`` entry, or "auto"."""
        variable = spec.model_env_var
        return (variable and os.getenv(variable, "").strip()) or self.models.get(spec.name, "auto")


class _ProjectFile(PydanticBaseSettingsSource):
    """imagegen.toml, with its relative folders made relative to the file's folder."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # the whole file is read at once in __call__

    def __call__(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        with self.path.open("rb") as handle:
            values = tomllib.load(handle)
        folder = self.path.parent.resolve()
        for name in FOLDER_SETTINGS:
            value = values.get(name, ProjectConfig.model_fields[name].default)
            if value and "://" not in value and not Path(value).expanduser().is_absolute():
                values[name] = str(folder / value)
        return values


class _ProjectSettings(ProjectConfig, BaseSettings):
    """ProjectConfig read from the environment, then the file, then the defaults."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="forbid", frozen=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _ProjectFile(settings_cls, config_file())


def config_file() -> Path | None:
    """The project's configuration file, if there is one."""
    path = Path(os.getenv(CONFIG_ENV_VAR) or CONFIG_FILE)
    return path if path.is_file() else None


def load_project_config() -> ProjectConfig:
    """The project's configuration: environment over file over defaults, validated."""
    # Steps ask for it per set and per table they write; read again only when an input changed.
    path = config_file()
    file = (str(path.resolve()), path.stat().st_mtime_ns, path.stat().st_size) if path else None
    variables = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIX)))
    return _load_project_config(file, variables)


@functools.lru_cache(maxsize=8)
def _load_project_config(
    file: tuple[str, int, int] | None, variables: tuple[tuple[str, str], ...]
) -> ProjectConfig:
    try:
        settings = _ProjectSettings()
    except ValidationError as error:
        where = config_file() or "the environment"
        problems = []
        for item in error.errors():
            key = ".".join(str(part) for part in item["loc"])
            if item["type"] == "extra_forbidden":
                problems.append(f"unknown setting {key}")
            else:
                problems.append(f"{key} (or {ENV_PREFIX}{key.upper()}): {item['msg']}")
        known = ", ".join(ProjectConfig.model_fields)
        raise ConfigError(f"{where}: {'; '.join(problems)} (known settings: {known})") from None
    return ProjectConfig.model_validate(settings.model_dump())


def api_key(variable: str) -> str | None:
    """The API key in ``variable`` (e.g. GEMINI_API_KEY), or None when unset or blank. Read
    when asked, never stored in a setting: keys reach no log, table or run config."""
    return os.getenv(variable, "").strip() or None
