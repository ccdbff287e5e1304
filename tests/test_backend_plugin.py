"""A backend shipped by another package: installed beside the project, never named by it.

tests/plugins/sd15_backend is a distribution of its own that declares Stable Diffusion 1.5
under the ``imagegen_pipeline.backends`` entry-point group. Installed next to the project (no
project file touched), it must appear everywhere a backend does: the partitions and the CSV
column, the CLI (`imagegen models`), the demo and the comparison gallery, the sensor that
follows enhanced prompts and the bulk schedule.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PLUGIN = PROJECT_ROOT / "tests" / "plugins" / "sd15_backend"
VENV_BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

PROBE = """
import json, datetime
import dagster as dg
from imagegen_pipeline.definitions import defs
from imagegen_pipeline.defs.images.sensors import (
    bulk_generation_schedule, generate_after_prompts_sensor,
)
from imagegen_pipeline.defs.partitions import backend_partitions
from imagegen_pipeline.prompt_csv import read_prompt_csv
from pathlib import Path

report = {"partitions": backend_partitions.get_partition_keys()}
table = read_prompt_csv(Path(%(csv)r)).valid
report["csv_backends"] = sorted({b for row in table["backends"] for b in row})
with dg.DagsterInstance.get() as instance:
    instance.add_dynamic_partitions("prompt_sets", ["later"])
    prepare = defs.resolve_job_def("prepare_prompts")
    prepare.execute_in_process(partition_key="later", instance=instance)
    sensor = generate_after_prompts_sensor(dg.build_sensor_context(instance=instance))
    report["sensor"] = sorted(
        r.tags.get("dagster/asset_partition_range_start") or r.partition_key
        for r in sensor.run_requests
    )
    now = datetime.datetime.now(datetime.UTC)
    with dg.build_schedule_context(instance=instance, scheduled_execution_time=now) as context:
        scheduled = bulk_generation_schedule(context)
    requests = [] if isinstance(scheduled, dg.SkipReason) else scheduled
    report["schedule"] = sorted(
        r.tags.get("dagster/asset_partition_range_start") or r.partition_key for r in requests
    )
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def plugin_env(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_variables: dict[str, str]
) -> dict[str, str]:
    """The plugin installed into a folder of its own (pip --target), on PYTHONPATH."""
    root = tmp_path_factory.mktemp("plugin")
    source = root / "source"
    shutil.copytree(PLUGIN, source)  # the build leaves its files beside the sources
    site = root / "site"
    subprocess.run(
        [str(VENV_BIN / "pip"), "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    prompts = root / "prompts"
    prompts.mkdir()
    (prompts / "pets.csv").write_text(
        "prompt_id,prompt,backends\ncat,a cat on a windowsill,sd15\nowl,a brass owl,sd15\n"
    )
    environment = {
        **os.environ,
        **tiny_model_variables,
        "PYTHONPATH": str(site),
        "DAGSTER_HOME": str(root / "dagster_home"),
        "IMAGEGEN_PROMPTS_DIR": str(prompts),
        "IMAGEGEN_STORAGE": str(root / "storage"),
        "IMAGEGEN_MODELS_DIR": str(root / "models"),
        "HF_HUB_OFFLINE": "1",
    }
    environment.pop("GEMINI_API_KEY", None)
    return environment


def run(env: dict[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900
    )


def test_a_plugin_backend_is_everywhere_a_backend_is(plugin_env: dict[str, str]) -> None:
    imagegen = str(VENV_BIN / "imagegen")
    listed = run(plugin_env, imagegen, "models", "list")
    assert listed.returncode == 0, listed.stderr
    assert "sd15" in listed.stdout
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in listed.stdout

    built = run(plugin_env, imagegen, "models", "tiny", "sd15")
    assert built.returncode == 0, built.stdout + built.stderr
    tiny = Path(plugin_env["IMAGEGEN_MODELS_DIR"]) / "tiny" / "stable-diffusion-v1-5"
    assert (tiny / "model_index.json").is_file() and (tiny / "unet").is_dir()

    # Offline, the pull fails, naming the plugin's own repo (its files come from its spec).
    pulled = run(plugin_env, imagegen, "models", "pull", "sd15")
    assert pulled.returncode == 1
    assert "could not pull stable-diffusion-v1-5/stable-diffusion-v1-5" in pulled.stdout

    storage = Path(plugin_env["IMAGEGEN_STORAGE"])
    prompts = Path(plugin_env["IMAGEGEN_PROMPTS_DIR"])
    demo = run(plugin_env, imagegen, "demo", "--backends", "sd15")
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "backends sd15" in demo.stdout
    pngs = sorted((storage / "images" / "pets" / "sd15").rglob("*.png"))
    assert [png.parent.name for png in pngs] == ["cat", "owl"]
    gallery = (storage / "reports" / "pets" / "gallery.html").read_text()
    assert "sd15" in gallery

    # A second set arrives; it is prepared but not generated yet: the schedule's work.
    (prompts / "later.csv").write_text("prompt\na lighthouse in a storm\n")
    csv = prompts / "pets.csv"
    probe = run(plugin_env, sys.executable, "-c", PROBE % {"csv": str(csv)})
    assert probe.returncode == 0, probe.stderr[-4000:]
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    assert report["partitions"] == ["flux_schnell", "sdxl_turbo", "gemini", "sd15"]
    assert report["csv_backends"] == ["sd15"]
    assert "sd15|later" in report["sensor"] or "sd15|pets" in report["sensor"]
    assert "sd15|later" in report["schedule"]
