"""The speed mode on the tiny models (CPU): what compiling costs, that LoRA switches under
compile recompile nothing, and that compiled images equal eager ones.

Per local backend and compile mode: one step of ``--rows`` rows (12) over 3 LoRAs interleaved,
a third of them without LoRA, then a second step on the warm compiled model (other order,
other scales). Recorded: compile seconds and recompiles of each step (torch._dynamo's counters,
as the step row records them), step seconds, the largest pixel difference against the eager
backend. As a control, the same first step with hotswap turned off (switching by name, as
uncompiled models do) counts the recompiles hotswap avoids.

Inductor's on-disk kernel cache is pointed at a fresh folder, so compile seconds are a cold
worker's. This CPU says nothing about GPU speed: the tiny models are too small for compiled
kernels to win, and no GPU was available. Compile times here are tiny-model times on a shared
2-core CPU.

    .venv/bin/python -m benchmarks.compile [--rows 12] [--modes regional full]
        [--compile-backend inductor]

Ends with ``RESULT recompiles_on_switch=<n, all backends and modes> by_name_recompiles=<n>
max_pixel_diff=<of 255> mean_pixel_diff=<of 255, worst image> compile_seconds_max=<s>``.
Targets: recompiles_on_switch = 0, max_pixel_diff <= 8 and mean_pixel_diff <= 0.25 (the tests'
tolerance; a LoRA moves the mean by more than 10), by_name_recompiles > 0 (the control shows
what hotswap saves).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imagegen_pipeline.backends.base import ImageRequest
from imagegen_pipeline.lora import LoraRef, resolve_lora
from imagegen_pipeline.registry import MODELS
from imagegen_pipeline.tiny_models import build_tiny_model
from tests.support.loras import make_lora

BACKENDS = ("flux_schnell", "sdxl_turbo")
LORAS = 3
SIDE = 64


def requests(rows: int, loras, scales) -> list[ImageRequest]:
    """Row i uses LoRA i % 4 - 1 (none for every fourth row), at ``scales[i % len(scales)]``."""
    made = []
    for row in range(rows):
        pick = row % (LORAS + 1) - 1
        scale = scales[row % len(scales)]
        chosen = () if pick < 0 else (dataclasses.replace(loras[pick], scale=scale),)
        made.append(ImageRequest("bench", row, f"a cat, take {row}", "", row, SIDE, SIDE, chosen))
    return made


def run(backend, batch) -> tuple[dict[int, np.ndarray], float]:
    started = time.perf_counter()
    images = {}
    for result in backend.generate(batch):
        assert result.status == "ok", result.error
        images[result.request.image_index] = np.asarray(result.image, dtype=np.float32)
    return images, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--modes", nargs="+", default=["regional", "full"])
    parser.add_argument("--compile-backend", default="inductor")
    args = parser.parse_args()

    recompiles = by_name = 0
    worst_diff = worst_mean = worst_compile = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        # A cold kernel cache: compile seconds as a fresh worker pays them (inductor keeps
        # compiled kernels on disk across processes, which would hide them on a rerun).
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor-cache")
        for name in BACKENDS:
            spec = MODELS[name]
            model_dir = build_tiny_model(spec, Path(tmp) / "models")
            loras = [
                resolve_lora(
                    LoraRef(str(make_lora(name, model_dir, Path(tmp) / f"{name}{i}", i))), Path("/")
                )
                for i in range(LORAS)
            ]
            first = requests(args.rows, loras, (1.0, 0.6))
            second = list(reversed(requests(args.rows, loras, (0.8, 0.3))))
            settings = spec.settings(
                model=str(model_dir), device="cpu", width=SIDE, height=SIDE, batch_size=1
            )
            make = spec.implementation_class()
            eager = make(settings)
            expected_first, eager_seconds = run(eager, first)
            expected_second, _ = run(eager, second)
            print(f"{name} eager: step {eager_seconds:.2f} s")
            for mode in args.modes:
                torch._dynamo.reset()
                compiled = make(
                    settings.model_copy(
                        update={"compile": mode, "compile_backend": args.compile_backend}
                    )
                )
                for label, batch, expected in (
                    ("step 1", first, expected_first),
                    ("step 2", second, expected_second),
                ):
                    images, seconds = run(compiled, batch)
                    summary = compiled.run_summary().metadata
                    diff = max(float(np.abs(images[i] - expected[i]).max()) for i in expected)
                    mean = max(float(np.abs(images[i] - expected[i]).mean()) for i in expected)
                    recompiles += summary["recompiles"]
                    worst_diff = max(worst_diff, diff)
                    worst_mean = max(worst_mean, mean)
                    worst_compile = max(worst_compile, summary["compile_seconds"])
                    print(
                        f"{name} {mode} {label}: step {seconds:.2f} s, compile "
                        f"{summary['compile_seconds']:.2f} s, {compiled.compile_watch.graphs} "
                        f"graph(s), {summary['recompiles']} recompile(s), "
                        f"{summary['adapter_switches']} switch(es), pixel diff max {diff:g}, "
                        f"mean {mean:.3f} (worst image)"
                    )
            # Control: compiled, but switching by name (set_adapters), as without hotswap.
            torch._dynamo.reset()
            control = make(
                settings.model_copy(update={"compile": "regional", "compile_backend": "aot_eager"})
            )
            control.load()
            control.adapters.hotswap = False
            run(control, first)
            counted = control.run_summary().metadata["recompiles"]
            by_name += counted
            print(f"{name} regional (aot_eager), switching by name: {counted} recompile(s)")
    print(
        f"RESULT recompiles_on_switch={recompiles} by_name_recompiles={by_name} "
        f"max_pixel_diff={worst_diff:g} mean_pixel_diff={worst_mean:.3f} "
        f"compile_seconds_max={worst_compile:.2f}"
    )


if __name__ == "__main__":
    main()
