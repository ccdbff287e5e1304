"""A run killed mid-step (SIGKILL, a real subprocess) re-runs to completion, nothing corrupt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from PIL import Image

from imagegen_pipeline.atomic_files import TEMP_SUFFIX
from imagegen_pipeline.run_metadata import load_run_metadata

PROMPTS = 4
IMAGES_PER_PROMPT = 4


def demo_command(csv_path: Path) -> list[str]:
    return [
        sys.executable, "-m", "imagegen_pipeline.cli", "demo",
        "--prompts", str(csv_path), "--backends", "flux_schnell",
    ]  # fmt: skip


def test_killed_run_resumes_without_corrupt_or_duplicate_outputs(tmp_path, tiny_flux, tiny_sdxl):
    csv_path = tmp_path / "prompts" / "killme.csv"
    csv_path.parent.mkdir()
    rows = [
        f"p{i},a lighthouse number {i} in a storm,cinematic,{IMAGES_PER_PROMPT}"
        for i in range(PROMPTS)
    ]
    csv_path.write_text("prompt_id,prompt,style,num_images\n" + "\n".join(rows) + "\n")
    storage = tmp_path / "storage"
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "IMAGEGEN_STORAGE_DIR": str(storage),
        "IMAGEGEN_FLUX_SCHNELL_MODEL": str(tiny_flux),
        "IMAGEGEN_SDXL_TURBO_MODEL": str(tiny_sdxl),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # tiny models gain nothing from threads; spinning ones stall
    }
    flux_dir = storage / "images" / "killme" / "flux_schnell"

    process = subprocess.Popen(
        demo_command(csv_path), env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
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
        demo_command(csv_path), env=env, capture_output=True, text=True, timeout=600
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

    images = load_run_metadata(storage, "images")
    flux = images[images.backend == "flux_schnell"]
    last_run = flux[flux.run_id == flux.sort_values("finished_at").run_id.iloc[-1]]
    statuses = Counter(last_run["status"])
    assert statuses["skipped_existing"] >= written_before_kill
    assert statuses["ok"] + statuses["skipped_existing"] == PROMPTS * IMAGES_PER_PROMPT
