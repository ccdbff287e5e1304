"""A run killed mid-step (SIGKILL, a real subprocess) re-runs to completion, nothing corrupt,
and every image made before the kill keeps exactly one generation row."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from imagegen_pipeline.run_metadata import load_run_metadata
from imagegen_pipeline.storage import TEMP_SUFFIX

# Subprocesses for tens of seconds: handed out first, with the other slow modules.
pytestmark = pytest.mark.slow

PROMPTS = 4
IMAGES_PER_PROMPT = 4


def demo_command(prompts: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "imagegen_pipeline.cli",
        "demo",
        "--prompts",
        str(prompts),
        "--backends",
        "flux_schnell",
    ]


def test_killed_run_resumes_without_corrupt_or_duplicate_outputs(tmp_path, tiny_model_variables):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    rows = [
        f"p{i},a lighthouse number {i} in a storm,cinematic,{IMAGES_PER_PROMPT}"
        for i in range(PROMPTS)
    ]
    (prompts / "killme.csv").write_text("prompt_id,prompt,style,num_images\n" + "\n".join(rows))
    storage = tmp_path / "storage"
    env = {
        **os.environ,
        **tiny_model_variables,
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "IMAGEGEN_STORAGE": str(storage),
        "HF_HUB_OFFLINE": "1",
    }
    flux_dir = storage / "images" / "killme" / "flux_schnell"

    process = subprocess.Popen(
        demo_command(prompts),
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(list(flux_dir.rglob("*.png"))) < 3:
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    written_before_kill = len(list(flux_dir.rglob("*.png")))
    assert 3 <= written_before_kill < PROMPTS * IMAGES_PER_PROMPT, "killed mid-step"

    rerun = subprocess.run(
        demo_command(prompts), env=env, capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    # The killed run held the single gpu pool slot; the re-run must free it, not wait forever.
    assert "was interrupted; marked failed and its GPU slot freed" in rerun.stdout

    pngs = sorted(flux_dir.rglob("*.png"))
    assert len(pngs) == PROMPTS * IMAGES_PER_PROMPT
    # One file per (prompt, image index): the re-run reused, never duplicated.
    slots = Counter((png.parent.name, png.name.split("_")[0]) for png in pngs)
    assert set(slots.values()) == {1}
    for png in pngs:
        with Image.open(png) as image:
            image.verify()  # raises on a truncated or corrupt file
    assert not [p for p in flux_dir.rglob(f"*{TEMP_SUFFIX}")]

    # Every image on disk has exactly one generation row, with the seconds and seed of the run
    # that made it, whether its row was flushed before the kill or rebuilt from the PNG.
    images = load_run_metadata(storage, "images")
    made = images[(images.backend == "flux_schnell") & (images.status == "ok")]
    assert Counter(made["path"]) == Counter(str(png) for png in pngs)
    assert made["seconds"].gt(0).all() and made["seed"].notna().all()
    assert made["started_at"].notna().all()
    steps = load_run_metadata(storage, "steps")
    rerun_ids = set(steps.loc[steps.skipped_existing > 0, "run_id"])
    assert len(made[~made.run_id.isin(rerun_ids)]) >= written_before_kill
