"""Dagster's `dg` CLI works on this project beside `make ui` and the `dagster` forms."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import PROJECT_ROOT


def test_dg_check_defs_passes(tmp_path: Path):
    dg = Path(sys.executable).parent / "dg"
    done = subprocess.run(
        [str(dg), "check", "defs"],
        cwd=PROJECT_ROOT,
        env={
            **os.environ,
            "PYTHONPATH": str(PROJECT_ROOT),
            "DAGSTER_HOME": str(tmp_path),
            "HF_HUB_OFFLINE": "1",
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "All definitions loaded successfully" in output
    assert "virtual environment does not match" not in output  # the README's .venv/bin/dg form
