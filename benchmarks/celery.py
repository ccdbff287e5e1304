"""The celery executor against the multiprocess executor, on CPU with the tiny models.

The same work three times: 4 prompt sets x 2 local backends (FLUX.1-schnell, SDXL-Turbo), one
``generate_images`` run per prompt set x backend partition (8 runs: images, quality, clips,
video_quality and the checks), submitted by two orchestrator processes at once (one per
backend, its 4 runs one after another), each time into a fresh prefix of the bucket:

- ``multiprocess``: Dagster's multiprocess executor, a process per step (forkserver with the
  project preloaded); the ``gpu`` pool at 1, i.e. one GPU;
- ``celery 1w``: the celery executor, one default-queue worker and 1 ``gpu``-queue worker;
- ``celery 2w``: the same with 2 ``gpu``-queue workers and the ``gpu`` pool at 2.

Real components as in tests/distributed: Redis, PostgreSQL (deploy/celery/dagster.yaml), a moto
S3 server for every output, ``dagster-celery worker start`` processes (deploy/celery/worker.yaml,
concurrency 1, the project imported before the pool forks). Workers are started and idle before
the clock starts (warm processes, no model loaded yet); the prompt tables are made beforehand,
untimed.

Figures per configuration: wall time (both orchestrators, from launch to exit), the span of the
runs (first start to last end, from the instance), model loads of the image backends (the
``images`` steps) and of every model, warm-cache hits, and where the GPU steps ran. Target:
image-model loads = gpu workers x backends, and celery with 1 worker no slower than the
multiprocess executor.

    .venv/bin/python -m benchmarks.celery [--prompts 3] [--images 2] [--side 64] [--wait-quiet 600]

On a shared machine, ``--wait-quiet`` waits for an idle machine before each configuration, and
the "other CPU s" column says how much CPU other people's processes took meanwhile.

Ends with ``RESULT loads_1w=... loads_2w=... celery1_vs_multiprocess=...`` (wall-time ratio).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.services import (  # noqa: E402
    CeleryWorker,
    JobRuns,
    celery_workers_by_step,
    postgres_env,
    start_celery_worker,
    start_postgres,
    start_redis,
    start_s3,
)

DEFINITIONS = "imagegen_pipeline.definitions"
BACKENDS = ("flux_schnell", "sdxl_turbo")
PROMPT_SETS = [f"bench_{i}" for i in range(4)]
GPU_STEPS = {"images.generate_on_gpu", "quality", "clips", "video_quality"}
CONFIGS = [("multiprocess", 0), ("celery", 1), ("celery", 2)]
RUN_TIMEOUT = 1800
SUBJECTS = ["lighthouse", "fox", "tea house", "robot", "caravan", "market", "owl", "alley"]
QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def range_tags(first: str, last: str) -> dict[str, str]:
    from imagegen_pipeline.local_runner import range_tags as tags

    return tags(first, last)


def write_prompt_sets(folder: Path, prompts: int, images: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for s, name in enumerate(PROMPT_SETS):
        rows = [
            f"s{s}p{i},a {SUBJECTS[(s + i) % len(SUBJECTS)]} number {i} at dusk,none,{images}"
            for i in range(prompts)
        ]
        (folder / f"{name}.csv").write_text(
            "prompt_id,prompt,style,num_images\n" + "\n".join(rows) + "\n"
        )


def run_config(side: int) -> dict[str, Any]:
    size = {"width": side, "height": side, "batch_size": 2}
    return {
        **QUIET,
        "resources": {
            "flux_schnell": {"config": {**size, "steps": 4}},
            "sdxl_turbo": {"config": {**size, "steps": 1}},
        },
    }


class ForeignCpu:
    """CPU seconds other people's processes used while a configuration ran (a shared machine
    makes wall times noisy): every process that is not this benchmark's (its descendants, and
    the PostgreSQL server, which runs as ``postgres``), sampled every 2 s."""

    def __init__(self) -> None:
        import threading

        self._seen: dict[int, tuple[float, float]] = {}  # pid -> (cpu at first sight, last)
        self._stop = threading.Event()
        self._started = time.time()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        mine = {me.pid, *(child.pid for child in me.children(recursive=True))}
        for process in psutil.process_iter(["pid", "username", "cpu_times", "create_time"]):
            info = process.info
            if info["pid"] in mine or info["username"] == "postgres" or not info["cpu_times"]:
                continue
            cpu = info["cpu_times"].user + info["cpu_times"].system
            first = self._seen.get(info["pid"], (None, 0.0))[0]
            if first is None:  # new: all of its CPU if it started during the measurement
                first = 0.0 if (info["create_time"] or 0) > self._started else cpu
            self._seen[info["pid"]] = (first, cpu)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self._sample()
            self._stop.wait(2)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(Exception):
            self._sample()
        return sum(last - first for first, last in self._seen.values())


def wait_quiet(seconds: float, threshold: float = 0.5) -> float:
    """Wait (at most ``seconds``) for the 1-minute load average to fall below ``threshold``;
    returns the load average then."""
    deadline = time.monotonic() + seconds
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def measure(
    label: str,
    executor: str,
    gpu_workers: int,
    *,
    base_env: dict[str, str],
    instance: Any,
    tmp: Path,
    bucket: str,
    redis_url: str,
    side: int,
) -> dict[str, Any]:
    """One configuration, from idle workers to the last run's end; its figures."""
    from dagster import DagsterRunStatus

    from imagegen_pipeline.run_metadata import load_run_metadata
    from imagegen_pipeline.storage import Storage

    prefix = f"bench-{label.replace(' ', '-')}-{uuid.uuid4().hex[:6]}"
    env = {
        **base_env,
        "IMAGEGEN_STORAGE": f"s3://{bucket}/{prefix}",
        "IMAGEGEN_EXECUTOR": executor,
        "IMAGEGEN_CELERY_BROKER": redis_url,
    }
    # the prompt tables of this prefix, untimed, in the orchestrating process
    prepare = JobRuns(
        [{"job": "prepare_prompts", "tags": range_tags(PROMPT_SETS[0], PROMPT_SETS[-1])}],
        module=DEFINITIONS,
        env={**env, "IMAGEGEN_EXECUTOR": "in_process"},
        cwd=ROOT,
        log_path=tmp / f"prepare-{prefix}.log",
    )
    assert all(r["success"] for r in prepare.wait(RUN_TIMEOUT)), prepare.log_tail()
    instance.event_log_storage.set_concurrency_slots("gpu", max(1, gpu_workers))

    workers: list[CeleryWorker] = []
    default: CeleryWorker | None = None
    try:
        if executor == "celery":
            common = {
                "broker_url": redis_url,
                "dagster_home": env["DAGSTER_HOME"],
                "env": env,
                "cwd": ROOT,
                "config_path": ROOT / "deploy" / "celery" / "worker.yaml",
                "includes": [DEFINITIONS],
            }
            default = start_celery_worker(tmp, name=f"default-{prefix}", **common)
            workers.append(default)
            for i in range(gpu_workers):
                workers.append(
                    start_celery_worker(tmp, name=f"gpu{i}-{prefix}", queues=["gpu"], **common)
                )
        config = run_config(side)
        batches = [
            [
                {
                    "job": "generate_images",
                    "tags": range_tags(f"{backend}|{s}", f"{backend}|{s}"),
                    "run_config": config,
                }
                for s in PROMPT_SETS
            ]
            for backend in BACKENDS
        ]
        foreign = ForeignCpu()
        started = time.perf_counter()
        orchestrators = [
            JobRuns(
                runs,
                module=DEFINITIONS,
                env=env,
                cwd=ROOT,
                log_path=tmp / f"orchestrator-{prefix}-{i}.log",
            )
            for i, runs in enumerate(batches)
        ]
        try:
            outcomes = [o.wait(RUN_TIMEOUT) for o in orchestrators]
        finally:
            for o in orchestrators:
                o.kill()
        wall = time.perf_counter() - started
        foreign_cpu = foreign.stop()
        for o, outcome in zip(orchestrators, outcomes, strict=True):
            assert len(outcome) == len(PROMPT_SETS) and all(r["success"] for r in outcome), (
                o.log_tail()
            )
    finally:
        for worker in workers:
            worker.stop()

    run_ids = [r["run_id"] for outcome in outcomes for r in outcome]
    records = [instance.get_run_record_by_id(run_id) for run_id in run_ids]
    assert all(r.dagster_run.status == DagsterRunStatus.SUCCESS for r in records)
    span = max(r.end_time for r in records) - min(r.start_time for r in records)
    steps = load_run_metadata(Storage(env["IMAGEGEN_STORAGE"]), "steps")
    steps = steps[steps["run_id"].isin(run_ids)]
    images = steps[steps["asset"] == "images"]
    placement: Counter[str] = Counter()
    off_queue = 0
    if executor == "celery":
        gpu_names = {w.hostname for w in workers if w is not default}
        for run_id in run_ids:
            for step, ran_on in celery_workers_by_step(instance, run_id).items():
                for worker in ran_on:
                    if step in GPU_STEPS:
                        placement[worker.split("-", 1)[0]] += 1
                        off_queue += worker not in gpu_names
                    else:
                        off_queue += default is None or worker != default.hostname
    else:
        placement.update(f"pid {w.split(':')[-1]}" for w in steps["worker"])
    gpu_step_seconds = [
        stat.end_time - stat.start_time
        for run_id in run_ids
        for stat in instance.get_run_step_stats(run_id)
        if stat.step_key in GPU_STEPS and stat.end_time and stat.start_time
    ]
    return {
        "label": label,
        "wall": wall,
        "span": span,
        "runs": len(run_ids),
        "images": int(images["generated"].sum()),
        "image_loads": int(images["model_loads"].sum()),
        "all_loads": int(steps["model_loads"].sum()),
        "hits": int(steps["model_cache_hits"].sum()),
        "image_hits": int(images["model_cache_hits"].sum()),
        "gpu_step_mean": sum(gpu_step_seconds) / len(gpu_step_seconds),
        "foreign_cpu": foreign_cpu,
        "gpu_steps": dict(placement),
        "gpu_processes": len(placement),
        "off_queue": off_queue,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=3, help="prompts per prompt set")
    parser.add_argument("--images", type=int, default=2, help="images per prompt")
    parser.add_argument("--side", type=int, default=64, help="image side in pixels")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        help="before each configuration, wait up to this many seconds for a load average < 0.5",
    )
    args = parser.parse_args(argv)

    os.environ["HF_HUB_OFFLINE"] = "1"
    from imagegen_pipeline.registry import MODELS
    from imagegen_pipeline.tiny_models import build_tiny_model

    with contextlib.ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="imagegen-celery-bench-"))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        models = tmp / "models"
        tiny = {
            "IMAGEGEN_FLUX_SCHNELL_MODEL": str(build_tiny_model(MODELS["flux_schnell"], models)),
            "IMAGEGEN_SDXL_TURBO_MODEL": str(build_tiny_model(MODELS["sdxl_turbo"], models)),
            "IMAGEGEN_SVD_MODEL": str(build_tiny_model(MODELS["svd"], models)),
            "IMAGEGEN_CLIP_MODEL": str(build_tiny_model(MODELS["clip_model"], models)),
        }
        redis = stack.enter_context(start_redis(tmp))
        postgres = stack.enter_context(start_postgres(tmp))
        s3 = stack.enter_context(start_s3(tmp))
        home = tmp / "dagster_home"
        home.mkdir()
        shutil.copy(ROOT / "deploy" / "celery" / "dagster.yaml", home / "dagster.yaml")
        prompts = tmp / "prompts"
        write_prompt_sets(prompts, args.prompts, args.images)
        inherited = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AWS_", "IMAGEGEN_", "DAGSTER_", "GEMINI_"))
        }
        base_env = {
            **inherited,
            **tiny,
            **s3.env,
            **postgres_env(postgres),
            "DAGSTER_HOME": str(home),
            "IMAGEGEN_CONFIG": str(tmp / "no-imagegen.toml"),  # defaults + the variables here
            "IMAGEGEN_PROMPTS_DIR": str(prompts),
            "IMAGEGEN_DEVICE": "cpu",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
        }
        os.environ.update({**postgres_env(postgres), **s3.env})
        import dagster as dg

        instance = dg.DagsterInstance.from_config(str(home))
        stack.callback(instance.dispose)
        instance.add_dynamic_partitions("prompt_sets", PROMPT_SETS)

        print(
            f"celery vs multiprocess: {len(PROMPT_SETS)} prompt sets x {len(BACKENDS)} backends "
            f"= {len(PROMPT_SETS) * len(BACKENDS)} runs (one per partition), {args.prompts} "
            f"prompts x {args.images} images per set, tiny models, {args.side}x{args.side} px"
        )
        print(
            f"machine: {socket.gethostname()}, {os.cpu_count()} CPU cores, no GPU, "
            f"Python {platform.python_version()}; OMP_NUM_THREADS=1; outputs on moto S3, "
            "instance on PostgreSQL, broker Redis"
        )
        rows = []
        host, port = redis.params["host"], redis.params["port"]
        for db, (executor, gpu_workers) in enumerate(CONFIGS, start=1):
            label = executor if executor != "celery" else f"celery {gpu_workers}w"
            load = wait_quiet(args.wait_quiet) if args.wait_quiet else os.getloadavg()[0]
            row = measure(
                label,
                executor,
                gpu_workers,
                base_env=base_env,
                instance=instance,
                tmp=tmp,
                bucket=s3.bucket,
                redis_url=f"redis://{host}:{port}/{db}",
                side=args.side,
            )
            rows.append({**row, "load": load})
            print(
                f"  {label}: {row['wall']:.1f} s (load average before: {load:.2f}; other "
                f"processes used {row['foreign_cpu']:.0f} CPU s meanwhile)",
                flush=True,
            )

        print()
        header = (
            f"{'configuration':<14}{'wall s':>8}{'runs s':>8}{'images':>8}{'img loads':>11}"
            f"{'all loads':>11}{'hits':>6}{'img hits':>10}{'GPU step s':>12}{'other CPU s':>13}"
            "  GPU steps per process"
        )
        print(header)
        for row in rows:
            counts = sorted(row["gpu_steps"].items())
            if counts and all(v == 1 for _, v in counts):
                placed = f"{len(counts)} processes, 1 each"
            else:
                placed = ", ".join(f"{k}: {v}" for k, v in counts)
            print(
                f"{row['label']:<14}{row['wall']:>8.1f}{row['span']:>8.1f}{row['images']:>8}"
                f"{row['image_loads']:>11}{row['all_loads']:>11}{row['hits']:>6}"
                f"{row['image_hits']:>10}{row['gpu_step_mean']:>12.1f}{row['foreign_cpu']:>13.0f}"
                f"  {placed}"
            )
        by_label = {row["label"]: row for row in rows}
        mp, one, two = by_label["multiprocess"], by_label["celery 1w"], by_label["celery 2w"]
        print(
            "\nimg loads: loads of the image backends (images steps); all loads: every model "
            "(+ CLIP in quality/video_quality, SVD in clips); hits: steps that found their model "
            "warm; GPU step s: mean duration of a GPU step (images, quality, clips, "
            "video_quality); runs s: first run start to last run end; other CPU s: CPU "
            "seconds of processes that are not this benchmark's, during the configuration "
            "(on a shared machine: how much the figures are disturbed)."
        )
        print(
            f"steps on the wrong queue: celery 1w {one['off_queue']}, celery 2w {two['off_queue']}"
        )
        print(
            f"target loads = gpu workers x backends: 1w {one['image_loads']} (want "
            f"{1 * len(BACKENDS)}), 2w {two['image_loads']} (want {2 * len(BACKENDS)})"
        )
        print(
            f"RESULT loads_1w={one['image_loads']} loads_2w={two['image_loads']} "
            f"celery1_vs_multiprocess={one['wall'] / mp['wall']:.2f}"
        )


if __name__ == "__main__":
    main()
