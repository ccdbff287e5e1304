"""Shared fixtures: tiny random-weight models, a temporary Dagster home, resources, servers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from imagegen_pipeline.tiny_models import build_tiny_model

# Tests never reach a model hub: every model is built locally in the real repos' layout.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("GEMINI_API_KEY", None)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TEST_IMAGE_SIDE = 64  # tiny models draw noise; small images keep the suite fast

EXAMPLE_CSV = """prompt_id,prompt,style,seed,num_images,backends
cat,a cat sleeping on a sunny windowsill,photorealistic,11,2,
city,a neon city street at night in the rain,cinematic,,1,
owl,a brass clockwork owl perched on an old book,artistic,,1,flux_schnell
"""


# --- tiny models ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder of tiny models per test session (and per xdist worker)."""
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_flux(tiny_models_dir: Path) -> Path:
    """A tiny FLUX.1-schnell in the black-forest-labs/FLUX.1-schnell layout."""
    return build_tiny_model("flux_schnell", tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_models_dir: Path) -> Path:
    """A tiny SDXL-Turbo in the stabilityai/sdxl-turbo layout (fp16 variant files included)."""
    return build_tiny_model("sdxl_turbo", tiny_models_dir)


# --- Dagster --------------------------------------------------------------------------------


@pytest.fixture
def dagster_instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    """A Dagster instance in a temporary DAGSTER_HOME with the project's dagster.yaml."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    overrides = yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text())
    with dg.instance_for_test(temp_dir=str(home), overrides=overrides) as instance:
        yield instance


@pytest.fixture
def prompts_dir(tmp_path: Path) -> Path:
    """A prompts folder holding ``example.csv`` (three prompts, four images per backend max)."""
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "example.csv").write_text(EXAMPLE_CSV)
    return folder


@pytest.fixture
def make_resources(
    tmp_path: Path, prompts_dir: Path, tiny_flux: Path, tiny_sdxl: Path
) -> Callable[..., dict[str, Any]]:
    """Build the project's resources on the tiny models and temporary folders.

    Keyword arguments replace whole resources, e.g. ``make_resources(flux_schnell=...)``.
    """
    from imagegen_pipeline.defs.resources import default_resources

    def make(**overrides: Any) -> dict[str, Any]:
        resources = default_resources()
        storage = resources["storage"].model_copy(
            update={"prompts_dir": str(prompts_dir), "base_dir": str(tmp_path / "storage")}
        )
        size = {"width": TEST_IMAGE_SIDE, "height": TEST_IMAGE_SIDE}
        resources.update(
            storage=storage,
            io_manager=resources["io_manager"].model_copy(update={"storage": storage}),
            flux_schnell=resources["flux_schnell"].model_copy(
                update={"model": str(tiny_flux), "batch_size": 2, **size}
            ),
            sdxl_turbo=resources["sdxl_turbo"].model_copy(
                update={"model": str(tiny_sdxl), "batch_size": 2, **size}
            ),
        )
        resources.update(overrides)
        return resources

    return make
