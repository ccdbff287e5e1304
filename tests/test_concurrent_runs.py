"""Two ``imagegen demo`` processes on one storage at the same time (each with its own Dagster
home, as two users or a sensor's run and a backfill would be): every image and every clip is
made once, because each partition step holds its claim (imagegen_pipeline/claims.py) while it
lists and makes its outputs, and the run that waited finds them made."""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from imagegen_pipeline.run_metadata import load_run_metadata
from tests.test_kill_and_resume import demo_command

# Subprocesses for tens of seconds: handed out first, with the other slow modules.
pytestmark = pytest.mark.slow

PROMPTS = 3
IMAGES_PER_PROMPT = 2
SET = "together"


def test_two_demo_runs_at_once_make_each_image_and_clip_once(tmp_path: Path, tiny_model_variables):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    rows = [
        f"p{i},a harbour number {i} at dawn,cinematic,{IMAGES_PER_PROMPT}" for i in range(PROMPTS)
    ]
    (prompts / f"{SET}.csv").write_text("prompt_id,prompt,style,num_images\n" + "\n".join(rows))
    storage = tmp_path / "storage"
    base_env = {
        **os.environ,
        **tiny_model_variables,
        "IMAGEGEN_STORAGE": str(storage),
        "HF_HUB_OFFLINE": "1",
    }
    runs = [
        subprocess.Popen(
            demo_command(prompts),
            env={**base_env, "DAGSTER_HOME": str(tmp_path / f"dagster_home_{n}")},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for n in range(2)
    ]
    outputs = []
    try:
        for run in runs:
            output, _ = run.communicate(timeout=600)
            outputs.append(output)
            assert run.returncode == 0, output[-6000:]
    finally:
        for run in runs:
            if run.poll() is None:
                os.killpg(run.pid, 9)
    # the two runs did overlap: one waited for the other's images step
    assert any(f"Waiting for images/{SET}/flux_schnell" in output for output in outputs), [
        output[-3000:] for output in outputs
    ]

    planned = PROMPTS * IMAGES_PER_PROMPT
    images = load_run_metadata(str(storage), "images", prompt_set=SET, backend="flux_schnell")
    made = images[images.status == "ok"]
    # One run made every image; the other found them: its step row counts them, no row each.
    assert len(set(images["run_id"])) == 1
    steps = load_run_metadata(str(storage), "steps", prompt_set=SET, backend="flux_schnell")
    image_steps = steps[steps["asset"] == "images"]
    assert sorted(image_steps["skipped_existing"]) == [0, planned]
    assert sorted(image_steps["generated"]) == [0, planned]
    assert Counter(made["image_id"]).most_common(1)[0][1] == 1  # one ok row per image
    assert made["image_id"].nunique() == planned
    pngs = sorted((storage / "images" / SET / "flux_schnell").rglob("*.png"))
    assert len(pngs) == planned
    assert set(Counter((p.parent.name, p.name.split("_")[0]) for p in pngs).values()) == {1}
    assert sorted(made["path"]) == [str(p) for p in pngs]

    clips = load_run_metadata(str(storage), "clips", prompt_set=SET, backend="flux_schnell")
    made_clips = clips[clips.status == "ok"]
    assert len(made_clips) > 0
    assert Counter(made_clips["clip_id"]).most_common(1)[0][1] == 1  # one ok row per clip
    mp4s = sorted((storage / "clips" / SET / "flux_schnell").rglob("*.mp4"))
    assert len(mp4s) == len(made_clips)
    assert set(Counter((p.parent.name, p.name.split("_")[0]) for p in mp4s).values()) == {1}
    assert not list((storage / "claims").rglob("*.json"))  # every claim released
