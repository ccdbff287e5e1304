"""The ``imagegen`` command as a user types it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from imagegen_pipeline import cli
from imagegen_pipeline.run_metadata import load_run_metadata
from tests.conftest import PROJECT_ROOT, SECOND_CSV


def variables(tmp_path: Path) -> dict[str, str]:
    """The project's folders under ``tmp_path``."""
    return {
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "IMAGEGEN_STORAGE": str(tmp_path / "storage"),
        "IMAGEGEN_PROMPTS_DIR": str(tmp_path / "project_prompts"),
    }


def imagegen(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **variables(tmp_path), "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "imagegen_pipeline.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_demo_takes_a_single_csv_file(
    tmp_path: Path, tiny_model_variables: dict[str, str], monkeypatch, capsys
):
    # In this process, where torch is imported already (the kill-and-resume and concurrent-run
    # tests start `imagegen demo` as a process of its own).
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "lighthouse.csv").write_text(SECOND_CSV)
    (folder / "other.csv").write_text(SECOND_CSV)  # same folder, not asked for
    for name, value in {**tiny_model_variables, **variables(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    code = cli.main(
        ["demo", "--prompts", str(folder / "lighthouse.csv"), "--backends", "sdxl_turbo"]
    )
    assert code == 0
    assert "Prompt sets lighthouse; backends sdxl_turbo" in capsys.readouterr().out
    images = load_run_metadata(tmp_path / "storage", "images")
    assert set(images.prompt_set) == {"lighthouse"} and len(images) == 2


def test_demo_refuses_a_file_that_is_not_a_prompt_csv(tmp_path: Path):
    notes = tmp_path / "notes.txt"
    notes.write_text("prompt\nhello\n")
    done = imagegen(tmp_path, "demo", "--prompts", str(notes))
    assert done.returncode == 1
    assert f"{notes}: not a usable prompt CSV" in done.stdout
