"""Does the present slow down with the past? Re-runs with nothing to make, on the tiny models.

1. A 1,000-image set (tiny SDXL-Turbo, 64 px, 125 prompts x 8 images) is made once by the real
   images step (``run_images_step``), then re-run ``--reruns`` times with nothing to make, each
   re-run also adding its ``steps`` row as the asset does. A re-run's time is the whole no-op
   step: sweep, folder listing, planning from the run metadata, the rows it writes. Reported:
   the median of the first 5 re-runs and of the last 5 (single re-runs on a shared 2-core
   machine move by tens of percent), the run-metadata files of the partition after the last
   re-run, and ``load_run_metadata`` of the images table then (current rows and history).
2. ``--sets`` prompt sets (one prompt, one image each, tiny SDXL-Turbo only) are made through
   Dagster (``local_runner.materialize_prompt_sets``: prepare, images + quality + clips, the
   comparison), then the same call again with nothing to make: its wall time, and the time of
   each of its runs. ``--profile`` writes a cProfile of that no-op to a file.
3. The peak RSS of one prepare run (validate and enhance one new set) in a fresh process.

Targets (issue "Every run pays for all earlier runs"): the last re-runs within 1.2x of the
first, metadata files bounded, the 200-set no-op under 60 s, a prepare run under 500 MB.

    .venv/bin/python -m benchmarks.history [--reruns 100] [--sets 200] [--profile FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from imagegen_pipeline.records import StepRecord
from imagegen_pipeline.run_metadata import load_run_metadata, write_records
from imagegen_pipeline.storage import Storage

SIDE = 64
PROMPTS, IMAGES_PER_PROMPT = 125, 8


def tiny_models(root: Path) -> dict[str, Path]:
    """The tiny random-weight models the benchmark runs on, built once under ``root``."""
    from imagegen_pipeline.registry import MODELS
    from imagegen_pipeline.tiny_models import build_tiny_model

    return {
        name: build_tiny_model(MODELS[name], root) for name in ("sdxl_turbo", "svd", "clip_model")
    }


def enhanced(prompts: int, images: int) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "prompt_id": [f"p{i:04d}" for i in range(prompts)],
            "enhanced_prompt": [f"prompt {i}: a lighthouse in a storm" for i in range(prompts)],
            "negative_prompt": "",
            "seed": None,
            "width": None,
            "height": None,
            "num_images": images,
            "backends": [["sdxl_turbo"]] * prompts,
        }
    )
    for column in ("seed", "width", "height"):
        table[column] = table[column].astype("Int64")
    return table


def reruns(workdir: Path, model: Path, count: int) -> dict[str, Any]:
    from imagegen_pipeline.backends.sdxl_turbo import SdxlTurboBackend, SdxlTurboSettings
    from imagegen_pipeline.steps.images import ImagesStepContext, plan_images, run_images_step

    storage = Storage(workdir / "one-set")
    backend = SdxlTurboBackend(
        SdxlTurboSettings(model=str(model), width=SIDE, height=SIDE, device="cpu", batch_size=8)
    )
    planned = plan_images(enhanced(PROMPTS, IMAGES_PER_PROMPT), backend.target)

    def never() -> Any:
        raise AssertionError("a re-run with nothing to make created the model")

    def run(number: int, factory: Any) -> float:
        step = ImagesStepContext(storage, "big", run_id=f"run-{number:04d}")
        started = time.perf_counter()
        outcome = run_images_step(backend.target, factory, planned, step, log=lambda _: None)
        write_records(
            storage,
            "steps",
            [
                StepRecord(
                    run_id=step.run_id,
                    asset="images",
                    prompt_set="big",
                    backend="sdxl_turbo",
                    model_id=None,
                    revision=None,
                    device=None,
                    worker="bench",
                    requested=len(outcome.records),
                    seconds=outcome.seconds,
                )
            ],
            run_id=step.run_id,
            prompt_set="big",
            backend="sdxl_turbo",
        )
        return time.perf_counter() - started

    made_s = run(0, lambda: backend)
    times = [run(number, never) for number in range(1, count + 1)]
    for number in (1, 2, 5, 10, 25, 50, 75, count):
        if number <= count:
            print(f"  re-run {number:4d}: {times[number - 1]:.3f} s")
    files = [p for p in (workdir / "one-set" / "run_metadata").rglob("*") if p.is_file()]
    started = time.perf_counter()
    current = load_run_metadata(storage, "images")
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    history = load_run_metadata(storage, "images", history=True)
    history_s = time.perf_counter() - started
    return {
        "made_s": made_s,
        "plan_s_first": statistics.median(times[:5]),
        "plan_s_100th": statistics.median(times[-5:]),
        "metadata_files": len(files),
        "load_s": load_s,
        "load_history_s": history_s,
        "current_rows": len(current),
        "history_rows": len(history),
    }


def resources(workdir: Path, models: dict[str, Path]) -> dict[str, Any]:
    from imagegen_pipeline.defs.model_resources import settings_resource
    from imagegen_pipeline.defs.resources import default_resources
    from imagegen_pipeline.defs.storage import StepOutputIOManager, StorageResource, TableIOManager
    from imagegen_pipeline.registry import MODELS

    def model(name: str, **values: Any) -> Any:
        return settings_resource(MODELS[name].settings)(**values)

    storage = StorageResource(base=str(workdir / "storage"), prompts_dir=str(workdir / "prompts"))
    return {
        **default_resources(),
        "storage": storage,
        "io_manager": TableIOManager(storage=storage),
        "step_io_manager": StepOutputIOManager(storage=storage),
        "sdxl_turbo": model(
            "sdxl_turbo", model=str(models["sdxl_turbo"]), width=SIDE, height=SIDE, batch_size=8
        ),
        # No clips: the clips step still plans, lists and records every set, and a tiny SVD
        # clip costs seconds a set here that say nothing about history.
        "svd": model("svd", model=str(models["svd"]), n=0),
        "clip_model": model("clip_model", model=f"local-dir:{models['clip_model']}"),
    }


def instance_overrides() -> dict[str, Any]:
    import yaml

    return yaml.safe_load((Path(__file__).parents[1] / "dagster.yaml").read_text())


def many_sets(workdir: Path, models: dict[str, Path], count: int, profile: str | None) -> dict:
    import dagster as dg

    from imagegen_pipeline.definitions import defs
    from imagegen_pipeline.local_runner import materialize_prompt_sets

    prompts = workdir / "prompts"
    prompts.mkdir()
    names = [f"set_{i:03d}" for i in range(count)]
    for name in names:
        (prompts / f"{name}.csv").write_text(f"prompt,num_images\n{name}: a ramen bowl,1\n")
    home = workdir / "home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home), overrides=instance_overrides()) as instance:
        res = resources(workdir, models)

        def everything() -> tuple[float, list[float]]:
            started = time.perf_counter()
            results = materialize_prompt_sets(
                defs, names, ["sdxl_turbo"], instance=instance, resources=res
            )
            wall = time.perf_counter() - started
            assert all(result.success for result in results)
            runs = [instance.get_run_record_by_id(r.run_id) for r in results]
            return wall, [round(r.end_time - r.start_time, 1) for r in runs if r and r.end_time]

        made_s, _ = everything()
        print(f"  {count} sets made in {made_s:.1f} s")
        profiler = cProfile.Profile() if profile else None
        if profiler:
            profiler.enable()
        noop_s, run_s = everything()
        if profiler:
            profiler.disable()
            profiler.dump_stats(profile)
        print(f"  no-op over {count} sets: {noop_s:.1f} s; runs {run_s}")
    return {"made_s": made_s, "noop_s": noop_s, "runs_s": run_s}


def prepare_once(workdir: Path) -> None:
    """In a fresh process: prepare one prompt set (the prepare run a new CSV gets)."""
    import dagster as dg

    from imagegen_pipeline.definitions import defs

    models = json.loads((workdir / "models.json").read_text())
    res = resources(workdir, {k: Path(v) for k, v in models.items()})
    with dg.instance_for_test(temp_dir=str(workdir / "home-prepare")) as instance:
        instance.add_dynamic_partitions("prompt_sets", ["fresh"])
        result = dg.materialize(
            [*defs.assets, *(defs.asset_checks or [])],
            selection=dg.AssetSelection.groups("prompts"),
            partition_key="fresh",
            instance=instance,
            resources=res,
        )
        assert result.success
    # VmHWM, not ru_maxrss: a child forked from this benchmark (which holds torch and the
    # models) inherits the parent's resident pages in ru_maxrss, though exec dropped them.
    status = Path("/proc/self/status").read_text()
    peak_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    print(peak_kb / 1024)


def prepare_rss_mb(workdir: Path, models: dict[str, Path]) -> float:
    prompts = workdir / "prompts"
    prompts.mkdir(exist_ok=True)
    (prompts / "fresh.csv").write_text("prompt,style\na lighthouse on a cliff,cinematic\n")
    (workdir / "models.json").write_text(json.dumps({k: str(v) for k, v in models.items()}))
    (workdir / "home-prepare").mkdir(exist_ok=True)
    output = subprocess.run(
        [sys.executable, "-m", "benchmarks.history", "--prepare-once", str(workdir)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    ).stdout
    return float(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reruns", type=int, default=100)
    parser.add_argument("--sets", type=int, default=200)
    parser.add_argument("--profile", default=None, help="cProfile output of the no-op")
    parser.add_argument("--prepare-once", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare_once:
        prepare_once(Path(args.prepare_once))
        return
    with tempfile.TemporaryDirectory(prefix="history-bench-") as folder:
        workdir = Path(folder)
        models = tiny_models(workdir / "models")
        figures = []
        if args.reruns:  # 0 leaves a part out, to run the parts in separate processes
            print(f"1. one set of {PROMPTS * IMAGES_PER_PROMPT} images, {args.reruns} re-runs")
            one = reruns(workdir, models["sdxl_turbo"], args.reruns)
            print(f"  {json.dumps({k: round(v, 4) for k, v in one.items()})}")
            figures += [
                f"plan_s_first={one['plan_s_first']:.3f}",
                f"plan_s_100th={one['plan_s_100th']:.3f}",
                f"metadata_files_after_100={one['metadata_files']}",
                f"load_s_after_100={one['load_s']:.3f}",
            ]
        if args.sets:
            print(f"2. {args.sets} sets through Dagster, then again with nothing to make")
            many = many_sets(workdir, models, args.sets, args.profile)
            figures.append(f"noop_200_sets_s={many['noop_s']:.1f}")
            print("3. one prepare run in a fresh process")
            rss = prepare_rss_mb(workdir, models)
            print(f"  peak RSS {rss:.0f} MB")
            figures.append(f"prepare_rss_mb={rss:.0f}")
    print("RESULT " + " ".join(figures))


if __name__ == "__main__":
    main()
