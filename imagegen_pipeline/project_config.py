"""The one place a user configures the project: ``imagegen.toml``, then the environment.

Every entry point (``make demo``, ``make ui`` / ``dagster dev``, the daemon's sensors and
schedule, backfills, the CLI and celery workers) reads the same file, so they resolve the same
models, device and folders. A value in the environment wins over the file; the file wins over
the defaults below. The file is ``$IMAGEGEN_CONFIG`` if set, else ``imagegen.toml`` in the
working directory (the project folder for all of the above). Relative folders in the file (and
the default ones) are relative to the file's folder, so every process finds the same folders
whatever its working directory; relative folders in the environment, to the working directory.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from imagegen_pipeline.registry import BACKEND_NAMES, MODELS

CONFIG_ENV_VAR = "IMAGEGEN_CONFIG"
CONFIG_FILE = "imagegen.toml"
FOLDER_SETTINGS = ("prompts_dir", "storage", "models_dir")


@dataclass(frozen=True)
class ProjectConfig:
    """Folders, models, device and automation settings of this project."""

    prompts_dir: str = "prompts"  # the folder users drop prompt CSVs into
    storage: str = "storage"  # folder or URL (s3://bucket/prefix) all outputs go under
    models_dir: str = ""  # where tiny models are built; "" = <storage>/models, or a cache dir
    device: str = "auto"  # "auto" (CUDA when present, else the CPU), "cpu", "cuda", "cuda:1"
    backends: tuple[str, ...] = BACKEND_NAMES  # backends the sensors and schedule run
    models: dict[str, str] = field(default_factory=dict)  # per model name: "auto", repo or folder
    sensor_interval_seconds: int = 30  # how often the prompts folder is looked at
    bulk_cron: str = "0 2 * * *"  # when the bulk-generation schedule ticks (if turned on)
    executor: str = "in_process"  # in_process, multiprocess, celery or k8s (see README)

    @property
    def tiny_models_dir(self) -> Path:
        """The local folder tiny random-weight models are built in."""
        if self.models_dir:
            return Path(self.models_dir).expanduser() / "tiny"
        if "://" in self.storage:  # models must be on a local disk to load
            return Path("~/.cache/imagegen/models/tiny").expanduser()
        return Path(self.storage) / "models" / "tiny"

    def model_for(self, name: str) -> str:
        """What "auto" means for model ``name`` here: its variable, the file, or "auto"."""
        variable = MODELS[name].model_env_var
        return (variable and os.getenv(variable)) or self.models.get(name, "auto")


# Environment variables, the file's keys they override, and how to read them.
ENVIRONMENT: dict[str, tuple[str, Any]] = {
    "IMAGEGEN_PROMPTS_DIR": ("prompts_dir", str),
    "IMAGEGEN_STORAGE_DIR": ("storage", str),  # the older name; IMAGEGEN_STORAGE wins
    "IMAGEGEN_STORAGE": ("storage", str),
    "IMAGEGEN_MODELS_DIR": ("models_dir", str),
    "IMAGEGEN_DEVICE": ("device", str),
    "IMAGEGEN_BACKENDS": ("backends", lambda v: tuple(p for p in v.replace(",", " ").split())),
    "IMAGEGEN_SENSOR_INTERVAL_SECONDS": ("sensor_interval_seconds", int),
    "IMAGEGEN_BULK_CRON": ("bulk_cron", str),
    "IMAGEGEN_EXECUTOR": ("executor", str),
}


def config_file() -> Path | None:
    """The project's configuration file, if there is one."""
    path = Path(os.getenv(CONFIG_ENV_VAR) or CONFIG_FILE)
    return path if path.is_file() else None


def load_project_config() -> ProjectConfig:
    """The file's values over the defaults, the environment's over both."""
    values: dict[str, Any] = {}
    path = config_file()
    if path is not None:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
        known = {f.name for f in fields(ProjectConfig)}
        unknown = sorted(set(document) - known)
        if unknown:
            raise ValueError(
                f"{path}: unknown setting(s) {', '.join(unknown)}; known: {sorted(known)}"
            )
        values.update(document)
        for name in FOLDER_SETTINGS:
            value = values.get(name, getattr(ProjectConfig, name))
            if value and "://" not in value and not Path(value).expanduser().is_absolute():
                values[name] = str(path.parent.resolve() / value)
    for variable, (name, parse) in ENVIRONMENT.items():
        if os.getenv(variable):
            values[name] = parse(os.environ[variable])
    if "backends" in values:
        values["backends"] = tuple(values["backends"])
        unknown = sorted(set(values["backends"]) - set(BACKEND_NAMES))
        if unknown:
            raise ValueError(f"unknown backend(s) {', '.join(unknown)}; known: {BACKEND_NAMES}")
    return ProjectConfig(**values)
