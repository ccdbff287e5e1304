"""Shared fixtures: tiny random-weight models, a temporary Dagster home, resources, servers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import torch
import yaml

from imagegen_pipeline.registry import MODELS
from imagegen_pipeline.tiny_models import build_tiny_model
from tests.support.fake_servers import FAKE_GEMINI_KEY, FakeGemini, FakeOllama
from tests.support.xdist_groups import (  # noqa: F401 (hooks: which tests share a worker)
    pytest_collection_modifyitems,
    pytest_configure_node,
    pytest_xdist_make_scheduler,
)

# Tests never reach a model hub: every model is built locally in the real repos' layout.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("GEMINI_API_KEY", None)
# Tiny models gain nothing from intra-op threads, and spinning OpenMP threads stall badly when
# test processes share the CPU cores: one thread here and in every process a test starts (the
# daemon's runs, workers, CLIs), where waiting threads once doubled a run's CPU time.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = PROJECT_ROOT / "test-artifacts"  # screenshots kept for a person to look at
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)"
)
TEST_IMAGE_SIDE = 64  # tiny models draw noise; small images keep the suite fast

EXAMPLE_CSV = """prompt_id,prompt,style,seed,num_images,backends
cat,a cat sleeping on a sunny windowsill,photorealistic,11,2,
city,a neon city street at night in the rain,cinematic,,1,
owl,a brass clockwork owl perched on an old book,artistic,,1,flux_schnell
"""
SECOND_CSV = """prompt,style
a lighthouse on a cliff in a storm,cinematic
a bowl of ramen on a wooden table,photorealistic
"""


# --- tiny models ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder of tiny models per test session."""
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_flux(tiny_models_dir: Path) -> Path:
    """A tiny FLUX.1-schnell in the black-forest-labs/FLUX.1-schnell layout."""
    return build_tiny_model(MODELS["flux_schnell"], tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_models_dir: Path) -> Path:
    """A tiny SDXL-Turbo in the stabilityai/sdxl-turbo layout (fp16 variant files included)."""
    return build_tiny_model(MODELS["sdxl_turbo"], tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_svd(tiny_models_dir: Path) -> Path:
    """A tiny SVD-XT in the stabilityai/stable-video-diffusion-img2vid-xt layout."""
    return build_tiny_model(MODELS["svd"], tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_open_clip(tiny_models_dir: Path) -> Path:
    """A tiny open_clip CLIP (load it as ``local-dir:<path>``)."""
    return build_tiny_model(MODELS["clip_model"], tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_model_variables(
    tiny_flux: Path, tiny_sdxl: Path, tiny_svd: Path, tiny_open_clip: Path
) -> dict[str, str]:
    """The environment that points every "auto" model at the tiny builds (for subprocesses)."""
    return {
        "IMAGEGEN_FLUX_SCHNELL_MODEL": str(tiny_flux),
        "IMAGEGEN_SDXL_TURBO_MODEL": str(tiny_sdxl),
        "IMAGEGEN_SVD_MODEL": str(tiny_svd),
        "IMAGEGEN_CLIP_MODEL": str(tiny_open_clip),
    }


# --- Dagster --------------------------------------------------------------------------------


@contextmanager
def temporary_instance(home: Path) -> Iterator[dg.DagsterInstance]:
    """A Dagster instance in ``home`` (created) with the project's dagster.yaml."""
    home.mkdir(parents=True)
    overrides = yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text())
    with dg.instance_for_test(temp_dir=str(home), overrides=overrides) as instance:
        yield instance


@pytest.fixture
def dagster_instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    """A Dagster instance in a temporary DAGSTER_HOME with the project's dagster.yaml."""
    with temporary_instance(tmp_path / "dagster_home") as instance:
        yield instance


def write_prompts(root: Path) -> Path:
    """``root``/prompts holding ``example.csv`` (three prompts, four images per backend max)."""
    folder = root / "prompts"
    folder.mkdir()
    (folder / "example.csv").write_text(EXAMPLE_CSV)
    return folder


@pytest.fixture
def prompts_dir(tmp_path: Path) -> Path:
    """A prompts folder holding ``example.csv`` (three prompts, four images per backend max)."""
    return write_prompts(tmp_path)


def resources_maker(
    root: Path, prompts: Path, flux: Path, sdxl: Path, svd: Path, open_clip: Path
) -> Callable[..., dict[str, Any]]:
    """The project's resources on the tiny models (paths given), storage in ``root``/storage.

    Keyword arguments replace whole resources, e.g. ``make(flux_schnell=...)``."""
    from imagegen_pipeline.defs.model_resources import settings_resource
    from imagegen_pipeline.defs.resources import default_resources
    from imagegen_pipeline.defs.storage import (
        StepOutputIOManager,
        StorageResource,
        TableIOManager,
    )
    from imagegen_pipeline.registry import MODELS

    def model(name: str, **values: Any) -> dg.ConfigurableResource:
        return settings_resource(MODELS[name].settings)(**values)

    def make(**overrides: Any) -> dict[str, Any]:
        storage = StorageResource(base=str(root / "storage"), prompts_dir=str(prompts))
        size = {"width": TEST_IMAGE_SIDE, "height": TEST_IMAGE_SIDE, "batch_size": 2}
        resources = {
            **default_resources(),
            "storage": storage,
            "io_manager": TableIOManager(storage=storage),
            "step_io_manager": StepOutputIOManager(storage=storage),
            "flux_schnell": model("flux_schnell", model=str(flux), **size),
            "sdxl_turbo": model("sdxl_turbo", model=str(sdxl), **size),
            "svd": model("svd", model=str(svd)),
            "clip_model": model("clip_model", model=f"local-dir:{open_clip}", batch_size=4),
        }
        resources.update(overrides)
        return resources

    return make


@pytest.fixture
def make_resources(
    tmp_path: Path,
    prompts_dir: Path,
    tiny_flux: Path,
    tiny_sdxl: Path,
    tiny_svd: Path,
    tiny_open_clip: Path,
) -> Callable[..., dict[str, Any]]:
    """The project's resources on the tiny models and temporary folders.

    Keyword arguments replace whole resources, e.g. ``make_resources(flux_schnell=...)``.
    """
    return resources_maker(tmp_path, prompts_dir, tiny_flux, tiny_sdxl, tiny_svd, tiny_open_clip)


@pytest.fixture(autouse=True)
def no_stale_definitions_state() -> Iterator[None]:
    """Every test starts with no defs-state storage of an earlier test's instance: a Dagster
    instance sets it in a context variable when created, and one that was dropped without
    being closed leaves it pointing at a dead instance (Dagster 1.13)."""
    from dagster._core.storage.defs_state.base import _current_storage

    _current_storage.set(None)
    yield


@pytest.fixture(autouse=True)
def cold_model_cache() -> Iterator[None]:
    """Every test starts and ends with no model kept warm, so load counts are its own."""
    from imagegen_pipeline.model_cache import WARM_MODELS

    WARM_MODELS.clear()
    yield
    WARM_MODELS.clear()


# --- fake Gemini and Ollama servers (tests/support/fake_servers.py) -------------


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


# --- headless Chromium ----------------------------------------------------------------------


def chromium_screenshot(
    url: str, name: str, profile: Path, size: tuple[int, int] = (1280, 900), wait_ms: int = 0
) -> Path:
    """A screenshot of ``url`` in headless Chromium (driven by Playwright), taken once the page
    has loaded and every image on it has loaded (or failed), then ``wait_ms`` more (for pages
    whose scripts fetch and draw); kept as test-artifacts/<name>.

    Chromium's own ``--screenshot`` flag took its picture before a loaded machine had decoded
    the gallery's thumbnails, even with a virtual-time budget. The flags are the ones this
    machine's closed network needs: no background connections, no QUIC, no component updates
    (each would be refused, slowly)."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / name
    screenshot.unlink(missing_ok=True)
    flags = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            args=flags,
            viewport={"width": size[0], "height": size[1]},
        )
        try:
            page = browser.new_page()
            page.goto(url, wait_until="load", timeout=120_000)
            page.wait_for_function(
                "Array.from(document.images).every(i => i.complete)",
                timeout=120_000,
            )
            if wait_ms:
                page.wait_for_timeout(wait_ms)
            page.screenshot(path=str(screenshot))
        finally:
            browser.close()
    return screenshot
