"""Overhead of the ``images`` step against a bare diffusers loop, on the tiny FLUX model.

For each prompt count, two fresh processes make the same images in the same batches:
- ``step``: the Dagster ``images`` asset (plan, skip check, PNG + text chunks, sha256,
  run-metadata Parquet), materialized on an embedded instance; timed by Dagster's own step
  duration and by the whole run's wall time;
- ``bare``: FluxPipeline.from_pretrained + one pipeline call per batch + PNG save.
Each prints its timings, model loads and peak RSS; this script prints the comparison.

    python benchmarks/overhead.py             # 64 and 1024 prompts (the RSS/flatness check)
    python benchmarks/overhead.py --counts 256
Targets: step/bare <= 1.10, one model load per step, flat per-image time, RSS growth < 100 MB.
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

SIDE = 256  # large enough that generation, not bookkeeping, dominates on the tiny model
BATCH = 8
ROOT = Path(__file__).resolve().parent.parent


def write_prompts(folder: Path, count: int) -> None:
    subjects = ["lighthouse", "fox", "tea house", "robot", "caravan", "market", "owl", "alley"]
    rows = [
        f"p{i:05d},a {subjects[i % len(subjects)]} number {i} at dusk,none" for i in range(count)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.csv").write_text("prompt_id,prompt,style\n" + "\n".join(rows) + "\n")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_step(count: int, model: Path, workdir: Path) -> dict:
    import dagster as dg

    from imagegen_pipeline.definitions import defs
    from imagegen_pipeline.defs.resources import default_resources, reconfigured
    from imagegen_pipeline.run_metadata import load_run_metadata

    write_prompts(workdir / "prompts", count)
    resources = default_resources()
    storage = reconfigured(
        resources["storage"], prompts_dir=str(workdir / "prompts"), base_dir=str(workdir / "out")
    )
    resources.update(
        storage=storage,
        io_manager=reconfigured(resources["io_manager"], storage=storage),
        flux_schnell=reconfigured(
            resources["flux_schnell"], model=str(model), batch_size=BATCH, width=SIDE, height=SIDE
        ),
    )
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
            partition_key=dg.MultiPartitionKey({"prompt_set": "bench", "backend": "flux_schnell"}),
            instance=instance,
            resources=resources,
        )
        wall = time.perf_counter() - started
        stats = instance.get_run_step_stats(result.run_id)
    step = next(s for s in stats if s.step_key == "images")
    steps = load_run_metadata(workdir / "out", "steps")
    return {
        "seconds": step.end_time - step.start_time,
        "run_wall_seconds": wall,
        "model_loads": int(steps["model_loads"].sum()),
        "model_load_seconds": float(steps["model_load_seconds"].sum()),
        "images": int(steps["generated"].sum()),
    }


def run_bare(count: int, model: Path, workdir: Path) -> dict:
    import torch
    from diffusers import FluxPipeline

    from imagegen_pipeline.backends.base import derive_seed
    from imagegen_pipeline.enhancement import TemplateEnhancer

    enhancer = TemplateEnhancer()
    prompts = [
        (f"p{i:05d}", enhancer.enhance(f"a prompt number {i} at dusk", "none").text)
        for i in range(count)
    ]
    started = time.perf_counter()
    pipe = FluxPipeline.from_pretrained(str(model), dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = workdir / "bare"
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, count, BATCH):
        batch = prompts[start : start + BATCH]
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
    from imagegen_pipeline.tiny_models import build_tiny_model

    model = build_tiny_model("flux_schnell", ROOT / "storage" / "models" / "tiny")
    with tempfile.TemporaryDirectory() as tmp:
        figures = (run_step if mode == "step" else run_bare)(count, model, Path(tmp))
    figures["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(figures))


def measure(mode: str, count: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    output = subprocess.run(
        [sys.executable, __file__, "--worker", mode, "--counts", str(count)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--worker", choices=["step", "bare"])
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.counts[0])
        return

    print(
        f"tiny FLUX.1-schnell, {SIDE}x{SIDE}, 4 steps, batch {BATCH}, CPU, {os.cpu_count()} cores"
    )
    print(
        "prompts  bare s  step s  ratio  run wall s  img/s step  s/img step  loads"
        "  RSS bare MB  RSS step MB"
    )
    rows = {}
    for count in args.counts:
        bare, step = measure("bare", count), measure("step", count)
        rows[count] = step
        print(
            f"{count:7d}  {bare['seconds']:6.1f}  {step['seconds']:6.1f}  "
            f"{step['seconds'] / bare['seconds']:5.2f}  {step['run_wall_seconds']:10.1f}  "
            f"{step['images'] / step['seconds']:10.1f}  {step['seconds'] / step['images']:10.4f}  "
            f"{step['model_loads']:5d}  {bare['peak_rss_mb']:11.0f}  {step['peak_rss_mb']:11.0f}"
        )
    if len(rows) > 1:
        low, high = min(rows), max(rows)
        per_image = [rows[c]["seconds"] / rows[c]["images"] for c in (low, high)]
        growth = rows[high]["peak_rss_mb"] - rows[low]["peak_rss_mb"]
        print(
            f"per-image time {low} -> {high} prompts: x{per_image[1] / per_image[0]:.2f}; "
            f"peak RSS growth of the step: {growth:.0f} MB"
        )


if __name__ == "__main__":
    main()
