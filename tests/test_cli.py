"""The ``imagegen`` command as a user types it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from imagegen_pipeline.run_metadata import load_run_metadata
from tests.conftest import PROJECT_ROOT, SECOND_CSV


def imagegen(tmp_path: Path, variables: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        **variables,
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "IMAGEGEN_STORAGE": str(tmp_path / "storage"),
        "IMAGEGEN_PROMPTS_DIR": str(tmp_path / "project_prompts"),
        "PYTHONPATH": str(PROJECT_ROOT),
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "imagegen_pipeline.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_demo_takes_a_single_csv_file(tmp_path: Path, tiny_model_variables: dict[str, str]):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "lighthouse.csv").write_text(SECOND_CSV)
    (folder / "other.csv").write_text(SECOND_CSV)  # same folder, not asked for
    done = imagegen(
        tmp_path,
        tiny_model_variables,
        "demo",
        "--prompts",
        str(folder / "lighthouse.csv"),
        "--backends",
        "sdxl_turbo",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Prompt sets lighthouse; backends sdxl_turbo" in done.stdout
    images = load_run_metadata(tmp_path / "storage", "images")
    assert set(images.prompt_set) == {"lighthouse"} and len(images) == 2


def test_demo_refuses_a_file_that_is_not_a_prompt_csv(tmp_path: Path):
    notes = tmp_path / "notes.txt"
    notes.write_text("prompt\nhello\n")
    done = imagegen(tmp_path, {}, "demo", "--prompts", str(notes))
    assert done.returncode == 1
    assert f"{notes}: not a usable prompt CSV" in done.stdout
