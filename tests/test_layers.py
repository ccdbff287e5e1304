"""The code layout is a contract, checked: import layers, Dagster-free model code, small modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = PROJECT_ROOT / "imagegen_pipeline"
MAX_MODULE_LINES = 450


def test_import_layers_are_kept() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint_imports), "--no-cache"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_no_module_is_over_the_size_limit() -> None:
    sizes = {
        str(path.relative_to(PROJECT_ROOT)): len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
    }
    assert {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_definitions_load_without_model_libraries() -> None:
    # Loading the Dagster definitions (every sensor tick, every run start) must stay cheap.
    code = (
        "import sys, imagegen_pipeline.definitions; "
        "print(sorted(m for m in ('torch', 'diffusers', 'open_clip', 'google.genai') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert result.stdout.strip() == "[]"


def test_every_module_has_a_layer() -> None:
    # A module left out of the contract could import anything: each must be placed.
    import tomllib

    config = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    layers = config["tool"]["importlinter"]["contracts"][0]["layers"]
    placed = {
        name.strip().removeprefix("imagegen_pipeline.")
        for layer in layers
        for name in layer.replace("|", ":").split(":")
    }
    modules = {
        path.stem if path.is_file() else path.name
        for path in PACKAGE.iterdir()
        if (path.suffix == ".py" and path.stem != "__init__")
        or (path.is_dir() and (path / "__init__.py").is_file())
    }
    assert modules - placed == set()
