"""LoRA switching against reloading the base model, on the tiny models (CPU).

One prompt set of ``--rows`` rows (48) over 3 LoRAs interleaved in the CSV (row i uses LoRA
i % 3), per local backend:

- the images step as the pipeline runs it: the base model loads once, the work is grouped by
  adapter set and the adapters switch between groups (``adapter_switch_seconds``: every
  ``set_adapters``; reading each adapter file, once, is ``adapter_load_seconds``, a cost both
  ways share);
- a base reload per LoRA group, the cost where switching is missing (ComfyUI #6406): the base
  model's load seconds, once per group;
- a base reload per row (``--per-row``, slow).

Then one LoRA file changes and the step runs again: how many images are made again, against how
many rows use that LoRA.

    .venv/bin/python -m benchmarks.lora [--rows 48] [--per-row]

Ends with ``RESULT base_loads_per_backend=<n> switch_vs_reload=<switch s / reload s, worst
backend> rows_regenerated_after_lora_change=<n> of_rows_using_it=<n>``. Targets: 1 base load per
backend and step, switch_vs_reload <= 0.2, rows regenerated = rows using the changed LoRA.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from imagegen_pipeline.enhancement import enhance_prompts
from imagegen_pipeline.enhancement.template import TemplateEnhancer
from imagegen_pipeline.model_resolution import resolve_settings
from imagegen_pipeline.project_config import ProjectConfig
from imagegen_pipeline.prompt_csv import read_prompt_csv
from imagegen_pipeline.registry import MODELS
from imagegen_pipeline.steps.images import ImagesStepContext, plan_images, run_images_step
from imagegen_pipeline.storage import Storage
from imagegen_pipeline.tiny_models import build_tiny_model
from tests.support.loras import make_lora

BACKENDS = ("flux_schnell", "sdxl_turbo")
LORAS = 3
SIDE = 64


def backend_for(name: str, model_dir: Path):
    spec = MODELS[name]
    settings = spec.settings(model=str(model_dir), device="cpu", width=SIDE, height=SIDE)
    concrete, resolved = resolve_settings(spec, settings, ProjectConfig(device="cpu"))
    concrete = concrete.model_copy(update={"batch_size": 4, "offload": "none"})
    return spec.implementation_class()(concrete, model_id=resolved.model_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--per-row", action="store_true", help="also reload once per row")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    print(f"{args.rows} rows over {LORAS} LoRAs, interleaved; tiny models, CPU, {SIDE} px")
    loads, ratios, regenerated, using = [], [], 0, 0
    try:
        for name in BACKENDS:
            model_dir = build_tiny_model(MODELS[name], root / "models")
            loras = [make_lora(name, model_dir, root / name / f"lora{i}", i) for i in range(4)]
            csv = root / name / "set.csv"
            lines = ["prompt_id,prompt,backends,lora"]
            lines += [
                f"r{i:02d},a cat number {i},{name},{loras[i % LORAS]}:1.0" for i in range(args.rows)
            ]
            csv.write_text("\n".join(lines) + "\n")
            enhanced = enhance_prompts(read_prompt_csv(csv).valid, TemplateEnhancer())
            storage = Storage(root / name / "storage")

            backend = backend_for(name, model_dir)
            planned = plan_images(enhanced, backend.target)
            started = time.perf_counter()
            step = ImagesStepContext(storage=storage, prompt_set="bench", run_id="switch")
            outcome = run_images_step(backend.target, lambda b=backend: b, planned, step, print)
            step_seconds = time.perf_counter() - started
            summary = backend.run_summary().metadata
            switch_seconds = summary["adapter_switch_seconds"]

            # The base model loaded again for each LoRA group (and its adapter on top).
            reload_seconds = 0.0
            groups = {}
            for item in planned:
                groups.setdefault(item.request.loras, []).append(item.request)
            for requests in groups.values():
                fresh = backend_for(name, model_dir)
                reload_seconds += fresh.load()
                list(fresh.generate(requests))
                fresh.unload()
            per_row = ""
            if args.per_row:
                row_seconds = 0.0
                for item in planned:
                    fresh = backend_for(name, model_dir)
                    row_seconds += fresh.load()
                    list(fresh.generate([item.request]))
                    fresh.unload()
                per_row = f", a reload per row {row_seconds:.2f} s"
            ratio = switch_seconds / reload_seconds
            print(
                f"{name}: step {step_seconds:.1f} s for {outcome.generated} images, "
                f"{backend.model_loads} base load(s), {summary['adapter_loads']} adapter loads, "
                f"in {summary['adapter_load_seconds']:.2f} s, {summary['adapter_switches']} "
                f"switches in {switch_seconds:.3f} s; "
                f"a reload per group {reload_seconds:.2f} s{per_row}: ratio {ratio:.3f}"
            )
            loads.append(backend.model_loads)
            ratios.append(ratio)

            # Change LoRA 0's file: exactly its rows are made again.
            shutil.copy(loras[3], loras[0])
            again = plan_images(enhanced, backend.target)
            step = ImagesStepContext(storage=storage, prompt_set="bench", run_id="changed")
            changed = run_images_step(backend.target, lambda b=backend: b, again, step, print)
            rows_using = sum(1 for i in range(args.rows) if i % LORAS == 0)
            print(f"{name}: after changing lora0, {changed.generated} made again of {rows_using}")
            regenerated += changed.generated
            using += rows_using
            backend.unload()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"RESULT base_loads_per_backend={max(loads)} switch_vs_reload={max(ratios):.3f} "
        f"rows_regenerated_after_lora_change={regenerated} of_rows_using_it={using}"
    )


if __name__ == "__main__":
    main()
