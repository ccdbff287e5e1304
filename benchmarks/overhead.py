"""Overhead of the ``images`` step against a bare diffusers loop, on the tiny FLUX model.

For each prompt count, two fresh processes make the same images in the same batches:
- ``step``: the Dagster ``images`` asset (plan, skip check, overlapped writer threads, PNG with
  embedded facts, sha256, atomic writes, run metadata in Parquet parts), materialized on an
  embedded instance. It is timed by Dagster's step durations (both ops of the graph-backed
  asset, model load included) and by the whole run's wall time.
- ``bare``: FluxPipeline.from_pretrained, one pipeline call per batch, and ``image.save``.
Each reports its timings, model loads and peak RSS; this script prints the comparison. On the
tiny model the CPU both generates and writes, so this measures the step's bookkeeping. Whether
the writers keep up with a fast GPU is measured by ``accelerator_rate.py``.

    .venv/bin/python -m benchmarks.overhead             # 64 and 1024 prompts (RSS, flatness)
    .venv/bin/python -m benchmarks.overhead --counts 256
Targets: step/bare <= 1.10, one model load per step, flat per-image time, RSS growth < 100 MB.
Ends with ``RESULT ratio_<count>=... per_image_change=... rss_growth_mb=... model_loads=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIDE = 256  # large enough that generation, not bookkeeping, dominates on the tiny model
BATCH = 8
ROOT = Path(__file__).resolve().parent.parent
SUBJECTS = ["lighthouse", "fox", "tea house", "robot", "caravan", "market", "owl", "alley"]
MAX_RATIO = 1.10
MAX_RSS_GROWTH_MB = 100.0


def prompts(count: int) -> list[tuple[str, str]]:
    """(prompt id, prompt) of the benchmark's prompt set."""
    return [
        (f"p{i:05d}", f"a {SUBJECTS[i % len(SUBJECTS)]} number {i} at dusk") for i in range(count)
    ]


def write_prompts(folder: Path, count: int) -> None:
    """The prompt set as a CSV in ``folder`` (style "none")."""
    rows = [f"{prompt_id},{prompt},none" for prompt_id, prompt in prompts(count)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.csv").write_text("prompt_id,prompt,style\n" + "\n".join(rows) + "\n")


def peak_rss_mb() -> float:
    """This process's peak RSS so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_step(count: int, model: Path, workdir: Path) -> dict[str, Any]:
    """The images asset of one prompt set on the tiny FLUX model."""
    import dagster as dg

    from imagegen_pipeline.definitions import defs
    from imagegen_pipeline.defs.partitions import partition_key
    from imagegen_pipeline.defs.resources import default_resources, settings_resource
    from imagegen_pipeline.defs.storage import (
        StepOutputIOManager,
        StorageResource,
        TableIOManager,
    )
    from imagegen_pipeline.registry import MODELS
    from imagegen_pipeline.run_metadata import load_run_metadata

    write_prompts(workdir / "prompts", count)
    storage = StorageResource(base=str(workdir / "out"), prompts_dir=str(workdir / "prompts"))
    flux = settings_resource(MODELS["flux_schnell"].settings)
    resources = {
        **default_resources(),
        "storage": storage,
        "io_manager": TableIOManager(storage=storage),
        "step_io_manager": StepOutputIOManager(storage=storage),
        "flux_schnell": flux(model=str(model), batch_size=BATCH, width=SIDE, height=SIDE),
    }
    assets = [*defs.assets, *(defs.asset_checks or [])]
    (workdir / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(workdir / "home")) as instance:
        instance.add_dynamic_partitions("prompt_sets", ["bench"])
        dg.materialize(
            assets,
            selection=dg.AssetSelection.groups("prompts"),
            partition_key="bench",
            instance=instance,
            resources=resources,
        )
        started = time.perf_counter()
        result = dg.materialize(
            assets,
            selection=dg.AssetSelection.assets("images"),
            partition_key=str(partition_key("bench", "flux_schnell")),
            instance=instance,
            resources=resources,
        )
        wall = time.perf_counter() - started
        stats = instance.get_run_step_stats(result.run_id)
    steps = load_run_metadata(workdir / "out", "steps")
    return {
        "seconds": sum(s.end_time - s.start_time for s in stats),
        "run_wall_seconds": wall,
        "model_loads": int(steps["model_loads"].sum()),
        "model_load_seconds": float(steps["model_load_seconds"].sum()),
        "images": int(steps["generated"].sum()),
    }


def run_bare(count: int, model: Path, workdir: Path) -> dict[str, Any]:
    """The least a script can do to make the same images: load, call per batch, save."""
    import torch
    from diffusers import FluxPipeline

    from imagegen_pipeline.enhancement import TemplateEnhancer
    from imagegen_pipeline.steps.images import derive_seed

    enhancer = TemplateEnhancer()
    texts = [(pid, enhancer.enhance(prompt, "none").text) for pid, prompt in prompts(count)]
    started = time.perf_counter()
    pipe = FluxPipeline.from_pretrained(str(model), dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = workdir / "bare"
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, count, BATCH):
        batch = texts[start : start + BATCH]
        generators = [torch.Generator("cpu").manual_seed(derive_seed(pid, 0)) for pid, _ in batch]
        with torch.inference_mode():
            images = pipe(
                prompt=[text for _, text in batch],
                generator=generators,
                num_inference_steps=4,
                guidance_scale=0.0,
                width=SIDE,
                height=SIDE,
                max_sequence_length=256,
            ).images
        for (pid, _), image in zip(batch, images, strict=True):
            image.save(out / f"{pid}.png")
    return {"seconds": time.perf_counter() - started, "model_loads": 1, "images": count}


def worker(mode: str, count: int) -> None:
    """Measure one mode in this (fresh) process; print its figures as JSON."""
    from imagegen_pipeline.registry import MODELS
    from imagegen_pipeline.tiny_models import build_tiny_model

    model = build_tiny_model(MODELS["flux_schnell"], ROOT / "storage" / "models" / "tiny")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        figures = (run_step if mode == "step" else run_bare)(count, model, Path(tmp))
    figures["peak_rss_mb"] = peak_rss_mb()
    figures["load"] = [load_before, os.getloadavg()[0]]
    print(json.dumps(figures))


def measure(mode: str, count: int) -> dict[str, Any]:
    """One mode's figures, from a fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    output = subprocess.run(
        [sys.executable, __file__, "--worker", mode, "--counts", str(count)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> int:
    """The comparison for every count; 0 when every target is met."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--worker", choices=["step", "bare"])
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.counts[0])
        return 0

    print(
        f"tiny FLUX.1-schnell, {SIDE}x{SIDE}, 4 steps, batch {BATCH}, CPU, {os.cpu_count()} cores"
    )
    print(
        "prompts  bare s  step s  ratio  run wall s  img/s step  s/img step  loads"
        "  RSS bare MB  RSS step MB  load avg (bare, step)"
    )
    rows: dict[int, dict[str, Any]] = {}
    ratios: dict[int, float] = {}
    for count in args.counts:
        bare, step = measure("bare", count), measure("step", count)
        rows[count], ratios[count] = step, step["seconds"] / bare["seconds"]
        loads = ", ".join(f"{m['load'][0]:.1f}->{m['load'][1]:.1f}" for m in (bare, step))
        print(
            f"{count:7d}  {bare['seconds']:6.1f}  {step['seconds']:6.1f}  {ratios[count]:5.2f}  "
            f"{step['run_wall_seconds']:10.1f}  {step['images'] / step['seconds']:10.1f}  "
            f"{step['seconds'] / step['images']:10.4f}  {step['model_loads']:5d}  "
            f"{bare['peak_rss_mb']:11.0f}  {step['peak_rss_mb']:11.0f}  {loads}"
        )
    result = {f"ratio_{count}": ratio for count, ratio in ratios.items()}
    met = {
        f"step/bare <= {MAX_RATIO}": max(ratios.values()) <= MAX_RATIO,
        "one model load per step": all(row["model_loads"] == 1 for row in rows.values()),
    }
    if len(rows) > 1:
        low, high = min(rows), max(rows)
        per_image = [rows[c]["seconds"] / rows[c]["images"] for c in (low, high)]
        growth = rows[high]["peak_rss_mb"] - rows[low]["peak_rss_mb"]
        print(
            f"per-image time {low} -> {high} prompts: x{per_image[1] / per_image[0]:.2f}; "
            f"peak RSS growth of the step: {growth:.0f} MB"
        )
        result |= {"per_image_change": per_image[1] / per_image[0], "rss_growth_mb": growth}
        met[f"RSS growth < {MAX_RSS_GROWTH_MB:g} MB"] = growth < MAX_RSS_GROWTH_MB
    result["model_loads"] = max(row["model_loads"] for row in rows.values())
    for target, passed in met.items():
        print(f"  [{'PASS' if passed else 'FAIL'}] {target}")
    print("RESULT " + " ".join(f"{name}={value:.3f}" for name, value in result.items()))
    return 0 if all(met.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
