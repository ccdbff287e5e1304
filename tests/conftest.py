"""Shared fixtures: tiny random-weight models, a temporary Dagster home, resources, servers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import torch
import yaml

from imagegen_pipeline.tiny_models import build_tiny_model

# Tests never reach a model hub: every model is built locally in the real repos' layout.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("GEMINI_API_KEY", None)
# Tiny models gain nothing from intra-op threads, and spinning OpenMP threads stall badly when
# test processes share the CPU cores.
torch.set_num_threads(1)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TEST_IMAGE_SIDE = 64  # tiny models draw noise; small images keep the suite fast
# The smallest clips the tiny SVD makes (64 px is its minimum side): seconds, not minutes.
TINY_SVD_SETTINGS = {"width": 64, "height": 64, "num_frames": 4, "steps": 2, "decode_chunk_size": 2}

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


@pytest.fixture(scope="session")
def tiny_svd(tiny_models_dir: Path) -> Path:
    """A tiny SVD-XT in the stabilityai/stable-video-diffusion-img2vid-xt layout."""
    return build_tiny_model("svd_xt", tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_open_clip(tiny_models_dir: Path) -> Path:
    """A tiny open_clip CLIP (load it as ``local-dir:<path>``)."""
    return build_tiny_model("open_clip_vit_l_14", tiny_models_dir)


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
    tmp_path: Path,
    prompts_dir: Path,
    tiny_flux: Path,
    tiny_sdxl: Path,
    tiny_svd: Path,
    tiny_open_clip: Path,
) -> Callable[..., dict[str, Any]]:
    """Build the project's resources on the tiny models and temporary folders.

    Keyword arguments replace whole resources, e.g. ``make_resources(flux_schnell=...)``.
    """
    from imagegen_pipeline.defs.resources import default_resources, reconfigured

    def make(**overrides: Any) -> dict[str, Any]:
        resources = default_resources()
        storage = reconfigured(
            resources["storage"], prompts_dir=str(prompts_dir), base_dir=str(tmp_path / "storage")
        )
        size = {"width": TEST_IMAGE_SIDE, "height": TEST_IMAGE_SIDE}
        resources.update(
            storage=storage,
            io_manager=reconfigured(resources["io_manager"], storage=storage),
            flux_schnell=reconfigured(
                resources["flux_schnell"], model=str(tiny_flux), batch_size=2, **size
            ),
            sdxl_turbo=reconfigured(
                resources["sdxl_turbo"], model=str(tiny_sdxl), batch_size=2, **size
            ),
            svd=reconfigured(resources["svd"], model=str(tiny_svd), **TINY_SVD_SETTINGS),
            clip_scorer=reconfigured(
                resources["clip_scorer"], model=f"local-dir:{tiny_open_clip}", batch_size=4
            ),
        )
        resources.update(overrides)
        return resources

    return make


# --- fake Gemini and Ollama servers (tests/fake_servers.py) ---------------------------------

from imagegen_pipeline.testing.fake_servers import FAKE_GEMINI_KEY, FakeGemini, FakeOllama  # noqa: E402


@pytest.fixture
def fake_gemini() -> Iterator[FakeGemini]:
    """A local Gemini API on 127.0.0.1 that accepts only FAKE_GEMINI_KEY."""
    with FakeGemini(api_key=FAKE_GEMINI_KEY, hang_seconds=5.0) as server:
        yield server


@pytest.fixture
def fake_ollama() -> Iterator[FakeOllama]:
    """A local Ollama API on 127.0.0.1 serving the model "llama3.2"."""
    with FakeOllama(hang_seconds=5.0) as server:
        yield server
