"""Can the images and quality steps keep an H100 busy? Measured on this CPU with stand-ins.

No GPU is used and no GPU timing is measured. The stand-ins of
``tests.support.accelerator`` sleep for published per-image device times (the GIL
is free while they sleep, as during a CUDA synchronise) and return photographic images. Around
them run the real images step (planning, writer threads, PNG encoding with embedded facts,
sha256, atomic fsync-and-rename writes, run metadata in Parquet parts) and the real quality step
(prefetched decoding, pixel statistics, preprocessing, batched scoring). What is measured is
whether this machine's CPU work keeps up with the accelerator's rate.

1. Test images: PNG encode time and size of the stand-in's photos at levels 1 and 6, at 512
   and 1024 px, next to uniform noise, which stands for the old tiny models' output.
2. Images step: the SDXL-Turbo stand-in (512 px, batch 8, 28 ms an image) and the FLUX.1-schnell
   stand-in (1024 px, batch 4, 0.5 s an image), ``--images`` each, writing to a temporary folder
   on the local disk. Each runs with the default writer threads and with writer_threads=0, in a
   fresh process (for a clean RSS). The rate is images over the time from the first batch
   starting to the step returning: plan, load and folder listing are left out, the last writes
   and the last Parquet part are in. The ratio is that rate over the stand-in's own rate.
   Targets: ratio >= 0.90 (SDXL-Turbo) and >= 0.98 (FLUX.1-schnell), RSS growth < 200 MB.
3. Quality step: ``score_image_table`` with the ViT-L-14 stand-in (312 images/s), on
   ``--quality-images`` 1024 px PNGs written by the images step, against a bare loop that
   decodes and preprocesses the same files on as many threads. The bare loop is this machine's
   CPU ceiling. The two alternate in chunks of 128 images within each run, so both see the
   same machine. Target: step rate / bare rate >= 0.90.

Other people's processes share this machine. Each figure is measured ``--repeats`` times, and
each run first waits (up to ``--wait-quiet`` seconds) for the machine to go quiet. A run is
disturbed when other processes used more than ``--max-others`` cores and left less than half a
core idle. Such a run is printed, marked disturbed and run again, up to ``--attempts`` times;
the last attempt is kept. The load average and how busy both cores were (everyone's
work, and ours alone) are printed with every attempt. The RESULT line holds the mean of the
kept runs.

    .venv/bin/python -m benchmarks.accelerator_rate [--images 512] [--repeats 2]
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image

from imagegen_pipeline.run_metadata import load_run_metadata
from imagegen_pipeline.steps.images import ImagesStepContext, plan_images, run_images_step
from imagegen_pipeline.steps.skeleton import DEFAULT_WRITER_THREADS
from imagegen_pipeline.storage import Storage
from tests.support.accelerator import (
    DEVICE_SECONDS_PER_IMAGE,
    VIT_L_14_IMAGES_PER_SECOND,
    AcceleratorStandIn,
    PhotoSource,
    ScorerStandIn,
    enhanced_prompts,
)

TARGETS = {"sdxl_turbo": 0.90, "flux_schnell": 0.98}
BATCH_SIZES = {"sdxl_turbo": 8, "flux_schnell": 4}
QUALITY_TARGET = 0.90
QUALITY_CHUNK = 128  # images per alternation of bare loop and step (ABBA order)
RSS_LIMIT_MB = 200.0
# Encode times the issue quotes for Pillow's default level on the old tiny models' noise.
QUOTED_LEVEL6_MS = {512: "33-45", 1024: "120-170"}
QUIET: Callable[[str], None] = lambda message: None  # noqa: E731


# --- measuring the machine ------------------------------------------------------------------


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


@dataclass
class Usage:
    """How busy the machine and this process were over a stretch of time."""

    wall: float
    machine_busy_cores: float  # everyone's work, in cores (this machine has os.cpu_count())
    own_cores: float  # this process alone
    load_before: float
    load_after: float

    @property
    def others_cores(self) -> float:
        """Cores other processes used meanwhile."""
        return max(0.0, self.machine_busy_cores - self.own_cores)

    def describe(self) -> str:
        """One line for the report."""
        return (
            f"load {self.load_before:.2f}->{self.load_after:.2f}, cores busy "
            f"{self.machine_busy_cores:.2f}/{os.cpu_count()} (ours {self.own_cores:.2f}, "
            f"others {self.others_cores:.2f})"
        )


def others_cores(seconds: float = 1.0) -> float:
    """Cores busy over the next ``seconds`` with work that is not this process's."""
    process = psutil.Process()
    busy0, total0 = cpu_jiffies()
    own0 = sum(process.cpu_times()[:2])
    time.sleep(seconds)
    busy1, total1 = cpu_jiffies()
    own = sum(process.cpu_times()[:2]) - own0
    busy = (os.cpu_count() or 1) * (busy1 - busy0) / max(1, total1 - total0)
    return max(0.0, busy - own / seconds)


def wait_for_quiet(max_seconds: float, max_others: float = 0.25, quiet_for: int = 3) -> str:
    """Wait (up to ``max_seconds``) until other processes use under ``max_others`` cores for
    ``quiet_for`` seconds in a row; how it went, for the report."""
    if max_seconds <= 0:
        return "no wait"
    started, quiet, last = time.monotonic(), 0, 0.0
    while time.monotonic() - started < max_seconds:
        last = others_cores()
        quiet = quiet + 1 if last < max_others else 0
        if quiet >= quiet_for:
            return f"quiet after {time.monotonic() - started:.0f} s"
    return f"NOT quiet after {max_seconds:.0f} s (others {last:.2f} cores)"


@dataclass(frozen=True)
class Patience:
    """How hard to try for a run that other processes did not disturb."""

    wait_quiet: float  # seconds to wait for quiet before each attempt
    max_others: float  # cores other processes may always use during a kept run
    attempts: int  # attempts per figure; the last one is kept whatever happened
    headroom: float = 0.5  # beyond max_others, they may use what leaves this many cores idle

    def disturbed(self, usage: Usage) -> bool:
        """True when other processes took CPU the run may have needed."""
        idle = (os.cpu_count() or 1) - usage.machine_busy_cores
        return usage.others_cores > self.max_others and idle < self.headroom


def until_undisturbed(measure: Callable[[], dict[str, Any]], patience: Patience) -> list[dict]:
    """Every attempt at ``measure()`` (the kept one last): attempts stop at the first one that
    other processes did not disturb (``Patience.disturbed``)."""
    attempts: list[dict[str, Any]] = []
    for _ in range(max(1, patience.attempts)):
        quiet = wait_for_quiet(patience.wait_quiet)
        figures = measure()
        disturbed = patience.disturbed(Usage(**figures["usage"]))
        attempts.append({**figures, "quiet": quiet, "disturbed": disturbed})
        if not disturbed:
            break
    return attempts


def attempt_note(figures: dict[str, Any], kept: bool) -> str:
    """How an attempt went, for the report."""
    note = figures["quiet"]
    if figures["disturbed"]:
        note += "; DISTURBED by other processes, " + (
            "kept: no attempt left" if kept else "discarded"
        )
    return note


class RssSampler:
    """Samples this process's RSS every ``interval`` seconds on a thread; keeps the peak."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


@contextmanager
def measured() -> Iterator[dict[str, Usage]]:
    """Machine and process CPU use over the ``with`` block, in ``result["usage"]``."""
    result: dict[str, Usage] = {}
    process = psutil.Process()
    load_before = os.getloadavg()[0]
    busy0, total0 = cpu_jiffies()
    own0 = sum(process.cpu_times()[:2])
    started = time.perf_counter()
    yield result
    wall = time.perf_counter() - started
    busy1, total1 = cpu_jiffies()
    own = sum(process.cpu_times()[:2]) - own0
    cores = os.cpu_count() or 1
    result["usage"] = Usage(
        wall=wall,
        machine_busy_cores=cores * (busy1 - busy0) / max(1, total1 - total0),
        own_cores=own / wall,
        load_before=load_before,
        load_after=os.getloadavg()[0],
    )


def mb(value: float) -> float:
    """Bytes as MB (2**20)."""
    return value / 2**20


# --- 1. test images -------------------------------------------------------------------------


def png_figures(image: Image.Image, level: int, repeats: int = 2) -> tuple[float, float, int]:
    """(best wall seconds, best CPU seconds, bytes) of encoding ``image`` as a PNG at ``level``."""
    wall = cpu = float("inf")
    size = 0
    for _ in range(repeats):
        buffer = io.BytesIO()
        started, started_cpu = time.perf_counter(), time.thread_time()
        image.save(buffer, format="PNG", compress_level=level)
        cpu = min(cpu, time.thread_time() - started_cpu)
        wall = min(wall, time.perf_counter() - started)
        size = buffer.tell()
    return wall, cpu, size


def report_test_images(wait_quiet: float) -> None:
    """Encode time and size of the stand-in's photos against uniform noise."""
    photos = PhotoSource()
    rng = np.random.default_rng(0)
    print("\n== 1. Test images: PNG encode, Pillow, one thread, best of 2 per image ==")
    print(f"[{wait_for_quiet(wait_quiet)}]")
    print("images         side  level  wall ms  CPU ms  (medians)  MB (mean)  of raw  quoted ms")
    for side in (512, 1024):
        kinds = {
            f"{photos.pool_size} photos": photos.pool(side, side),
            "4 noise": [
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
                for _ in range(4)
            ],
        }
        for kind, images in kinds.items():
            for level in (1, 6):
                with measured() as usage:
                    figures = [png_figures(image, level) for image in images]
                wall, cpu = (statistics.median(f[i] for f in figures) for i in (0, 1))
                size = statistics.mean(f[2] for f in figures)
                quoted = QUOTED_LEVEL6_MS[side] if (level == 6 and "noise" in kind) else ""
                print(
                    f"{kind:<13}  {side:4d}  {level:5d}  {1000 * wall:7.1f}  {1000 * cpu:6.1f}"
                    f"             {mb(size):9.2f}  {size / (side * side * 3):6.2f}  {quoted:>9}"
                    f"  [{usage['usage'].describe()}]"
                )


# --- 2. the images step ---------------------------------------------------------------------


def run_images_case(stands_in_for: str, images: int, writer_threads: int) -> dict[str, Any]:
    """One images step with a stand-in, in this process; its figures as a dict."""
    backend = AcceleratorStandIn(stands_in_for, batch_size=BATCH_SIZES[stands_in_for])
    load_seconds = backend.load()  # the photos are made here, as weights would be loaded
    folder = Path(tempfile.mkdtemp(prefix="accelerator-rate-"))
    try:
        storage = Storage(folder)
        planned = plan_images(enhanced_prompts(images, [stands_in_for]), backend.target)
        step = ImagesStepContext(
            storage, "bench", f"bench-{os.getpid()}", writer_threads=writer_threads
        )
        gc.collect()
        baseline = psutil.Process().memory_info().rss
        with RssSampler() as rss, measured() as usage:
            outcome = run_images_step(backend.target, lambda: backend, planned, step, log=QUIET)
            finished = time.perf_counter()
        assert backend.generate_started is not None
        seconds = finished - backend.generate_started
        rows = load_run_metadata(storage, "images", prompt_set="bench", backend=stands_in_for)
        files = storage.list_files(storage.path("images", "bench", stands_in_for))
        sizes = [record.bytes or 0 for record in outcome.records]
        return {
            "case": stands_in_for,
            "writer_threads": writer_threads,
            "images": images,
            "ok": outcome.counts.get("ok", 0),
            "rows": len(rows),
            "distinct_rows": rows["image_id"].nunique(),
            "files": len(files),
            "mean_png_mb": mb(statistics.mean(sizes)),
            "seconds": seconds,
            "rate": images / seconds,
            "stand_in_rate": backend.images_per_second,
            "ratio": images / seconds / backend.images_per_second,
            "device_seconds": backend.device_seconds,
            # The device's idle share: time between batches the model thread spent on the host.
            "device_idle": 1 - backend.device_seconds / backend.generate_seconds,
            "load_seconds": load_seconds,
            "baseline_rss_mb": mb(baseline),
            "peak_rss_mb": mb(rss.peak),
            "rss_growth_mb": mb(rss.peak - baseline),
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "usage": usage["usage"].__dict__,
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def in_subprocess(*worker_args: str) -> dict[str, Any]:
    """Run ``--worker ...`` in a fresh Python process; its JSON answer."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    output = subprocess.run(
        [sys.executable, __file__, "--worker", *worker_args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


IMAGES_HEADER = (
    "case          writers  run  images   seconds  img/s  stand-in img/s  ratio  device idle"
    "  RSS base MB  peak MB  growth MB  MB/PNG"
)


def images_line(figures: dict[str, Any], run: int) -> str:
    """One run of one case as a table line, with the machine's load."""
    usage = Usage(**figures["usage"])
    return (
        f"{figures['case']:<13} {figures['writer_threads']:7d}  {run:3d}  {figures['ok']:6d}"
        f"  {figures['seconds']:8.2f}  {figures['rate']:5.2f}  {figures['stand_in_rate']:14.2f}"
        f"  {figures['ratio']:5.3f}  {figures['device_idle']:11.1%}  "
        f"{figures['baseline_rss_mb']:11.0f}  {figures['peak_rss_mb']:7.0f}  "
        f"{figures['rss_growth_mb']:9.1f}  {figures['mean_png_mb']:6.2f}\n"
        f"    [{usage.describe()}]"
    )


# --- 3. the quality step --------------------------------------------------------------------


def run_quality(images: int, repeats: int, patience: Patience) -> dict[str, Any]:
    """The quality step with the ViT-L-14 stand-in against a bare decode-and-preprocess loop."""
    from imagegen_pipeline.records import ImageRecord
    from imagegen_pipeline.steps.scores import Scorer, score_image_table

    folder = Path(tempfile.mkdtemp(prefix="accelerator-quality-"))
    try:
        storage = Storage(folder)
        maker = AcceleratorStandIn("flux_schnell", batch_size=4, seconds_per_image=0.0)
        enhanced = enhanced_prompts(images, ["flux_schnell"])
        planned = plan_images(enhanced, maker.target)
        made_in = ImagesStepContext(storage, "bench", "made")
        outcome = run_images_step(maker.target, lambda: maker, planned, made_in, log=QUIET)
        table = pd_table(outcome.records, ImageRecord)
        originals = dict(zip(enhanced["prompt_id"], enhanced["enhanced_prompt"], strict=True))
        paths = list(table["path"])
        scorer = ScorerStandIn()
        scorer.load()
        workers = scorer.config.workers

        def decode_and_preprocess(path: str) -> Any:
            with Image.open(io.BytesIO(Path(path).read_bytes())) as image:
                return scorer.preprocess(image.convert("RGB"))

        def bare(subset: list[str]) -> None:
            with ThreadPoolExecutor(workers, thread_name_prefix="bare") as pool:
                for _ in pool.map(decode_and_preprocess, subset):
                    pass

        def step(subset: Any) -> None:
            report = score_image_table(
                Scorer.of(scorer), subset, originals, storage=storage, workers=workers, log=QUIET
            )
            assert report["scored"].all(), report["score_error"].dropna().head()

        bare(paths[:64]), step(table.head(64))  # warm up: page cache, allocator, torch

        chunks = [slice(start, start + QUALITY_CHUNK) for start in range(0, images, QUALITY_CHUNK)]

        def paired() -> dict[str, Any]:
            # Bare and step alternate chunk by chunk (ABBA...), so a change in the machine's
            # load while the run lasts weighs on both alike.
            totals = {name: {"seconds": 0.0, "cpu": 0.0} for name in ("bare", "step")}
            slept = scorer.device_seconds
            with measured() as usage:
                for number, chunk in enumerate(chunks):
                    order = ("bare", "step") if number % 2 == 0 else ("step", "bare")
                    for name in order:
                        started, cpu = time.perf_counter(), time.process_time()
                        bare(paths[chunk]) if name == "bare" else step(table.iloc[chunk])
                        totals[name]["seconds"] += time.perf_counter() - started
                        totals[name]["cpu"] += time.process_time() - cpu
            for figures in totals.values():
                figures["rate"] = images / figures["seconds"]
                figures["cpu_ms_per_image"] = 1000 * figures["cpu"] / images
            totals["step"]["device_seconds"] = scorer.device_seconds - slept
            return {
                **totals,
                "ratio": totals["step"]["rate"] / totals["bare"]["rate"],
                "usage": usage["usage"].__dict__,
            }

        runs = [until_undisturbed(paired, patience) for _ in range(repeats)]
        return {
            "images": images,
            "workers": workers,
            "batch_size": scorer.config.batch_size,
            "mean_png_mb": mb(float(table["bytes"].mean())),
            "torch_threads": torch_threads(),
            "runs": runs,
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def pd_table(records: list[Any], record_type: type) -> Any:
    """Step records as the images table the asset hands on."""
    import pandas as pd

    return pd.DataFrame(
        [r.__dict__ for r in records], columns=list(record_type.__dataclass_fields__)
    )


def torch_threads() -> int:
    """Torch's intra-op threads in this process."""
    import torch

    return torch.get_num_threads()


# --- main -----------------------------------------------------------------------------------


def patience_of(args: argparse.Namespace) -> Patience:
    """The command line's patience with other processes."""
    return Patience(args.wait_quiet, args.max_others, args.attempts)


def patience_args(args: argparse.Namespace) -> list[str]:
    """The same patience, as arguments of a worker process."""
    return [
        *("--wait-quiet", str(args.wait_quiet), "--max-others", str(args.max_others)),
        *("--attempts", str(args.attempts)),
    ]


def worker(args: argparse.Namespace) -> None:
    """Measure one thing in this (fresh) process and print it as JSON."""
    what, *rest = args.worker
    if what == "images":
        figures = run_images_case(rest[0], args.images, int(rest[1]))
    else:
        figures = run_quality(args.quality_images, args.repeats, patience_of(args))
    print(json.dumps(figures))


def images_part(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Every images-step case, ``args.repeats`` times, each in a fresh process; the kept run of
    each repeat, by case."""
    print(f"\n== 2. Images step with the stand-ins, {args.images} images per run ==")
    print(IMAGES_HEADER)
    results: dict[str, list[dict[str, Any]]] = {}
    for run in range(1, args.repeats + 1):
        for case in TARGETS:
            for threads in (DEFAULT_WRITER_THREADS, 0):
                attempts = until_undisturbed(
                    lambda case=case, threads=threads: in_subprocess(
                        "images", case, str(threads), "--images", str(args.images)
                    ),
                    patience_of(args),
                )
                for number, figures in enumerate(attempts, 1):
                    counts = {figures[k] for k in ("ok", "rows", "distinct_rows", "files")}
                    assert counts == {args.images}, f"not one file and one row per image: {figures}"
                    kept = number == len(attempts)
                    print(f"{images_line(figures, run)} {attempt_note(figures, kept)}", flush=True)
                results.setdefault(f"{case}/{threads}", []).append(attempts[-1])
    print("\nmean of the kept runs:")
    for key, runs in results.items():
        ratios = ", ".join(f"{r['ratio']:.3f}" for r in runs)
        growth = max(r["rss_growth_mb"] for r in runs)
        mean = statistics.mean(r["ratio"] for r in runs)
        print(f"  {key:<16} ratio {mean:.3f} (runs {ratios}), RSS growth max {growth:.1f} MB")
    return results


def quality_part(args: argparse.Namespace) -> dict[str, Any]:
    """The quality step against the bare loop, in a fresh process."""
    quality = in_subprocess(
        "quality",
        *("--quality-images", str(args.quality_images), "--repeats", str(args.repeats)),
        *patience_args(args),
    )
    print(
        f"\n== 3. Quality step: ViT-L-14 stand-in ({VIT_L_14_IMAGES_PER_SECOND:g} images/s) on "
        f"{quality['images']} 1024 px PNGs ({quality['mean_png_mb']:.2f} MB each), "
        f"{quality['workers']} decode threads, batch {quality['batch_size']}, "
        f"torch threads {quality['torch_threads']} =="
    )
    print(
        f"run  bare img/s  step img/s  step/bare  CPU ms/image bare, step  scorer busy"
        f"  step vs scorer rate  (alternating {QUALITY_CHUNK}-image chunks)"
    )
    for number, attempts in enumerate(quality["runs"], 1):
        for index, run in enumerate(attempts, 1):
            bare, step = run["bare"], run["step"]
            print(
                f"{number:3d}  {bare['rate']:10.1f}  {step['rate']:10.1f}  {run['ratio']:9.3f}"
                f"  {bare['cpu_ms_per_image']:12.1f}, {step['cpu_ms_per_image']:4.1f}"
                f"  {step['device_seconds'] / step['seconds']:11.1%}"
                f"  {step['rate'] / VIT_L_14_IMAGES_PER_SECOND:19.3f}\n"
                f"     [{Usage(**run['usage']).describe()}] "
                f"{attempt_note(run, index == len(attempts))}"
            )
    return quality


def verdicts(
    results: dict[str, list[dict[str, Any]]], quality: dict[str, Any] | None
) -> tuple[dict[str, float], dict[str, bool]]:
    """The RESULT figures (means of the runs) and whether each target is met."""
    figures: dict[str, float] = {}
    met: dict[str, bool] = {}
    for case, target in TARGETS.items():
        runs = results.get(f"{case}/{DEFAULT_WRITER_THREADS}")
        if runs:
            ratio = statistics.mean(r["ratio"] for r in runs)
            figures[f"{case.split('_')[0]}_ratio"] = ratio
            met[f"{case}: ratio {ratio:.3f} >= {target}"] = ratio >= target
    if quality:
        ratio = statistics.mean(attempts[-1]["ratio"] for attempts in quality["runs"])
        figures["quality_ratio"] = ratio
        met[f"quality: step/bare {ratio:.3f} >= {QUALITY_TARGET}"] = ratio >= QUALITY_TARGET
    if results:
        growth = max(r["rss_growth_mb"] for runs in results.values() for r in runs)
        figures["rss_growth_mb"] = growth
        met[f"RSS growth {growth:.1f} MB < {RSS_LIMIT_MB:g} MB (every case)"] = (
            growth < RSS_LIMIT_MB
        )
    return figures, met


def main() -> int:
    """Every part; 0 when every target is met."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="images per images-step case")
    parser.add_argument("--quality-images", type=int, default=256, help="1024 px PNGs scored")
    parser.add_argument("--repeats", type=int, default=2, help="runs of every figure")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=300.0,
        help="before each run, wait up to this many seconds for other processes to go quiet",
    )
    parser.add_argument(
        "--max-others",
        type=float,
        default=0.25,
        help="a run during which other processes used more cores than this (and left less than "
        "half a core idle) is run again",
    )
    parser.add_argument("--attempts", type=int, default=4, help="attempts per run at most")
    parser.add_argument("--skip", nargs="*", default=[], choices=["photos", "images", "quality"])
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    print(__doc__.split("\n\n", 1)[0])
    published = ", ".join(
        f"{name} {side} px {seconds * 1000:g} ms/image"
        for name, (side, seconds) in DEVICE_SECONDS_PER_IMAGE.items()
    )
    print(
        f"GPU timings are NOT measured: the stand-ins sleep for published H100 figures "
        f"({published}; ViT-L-14 {VIT_L_14_IMAGES_PER_SECOND:g} images/s). Everything around "
        "them is the real pipeline on this CPU."
    )
    print(
        f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.1f} GiB, "
        f"torch threads {torch_threads()}, default writer threads {DEFAULT_WRITER_THREADS}, "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}, "
        f"storage in a temporary folder under {tempfile.gettempdir()}"
    )
    if "photos" not in args.skip:
        report_test_images(args.wait_quiet)
    results = images_part(args) if "images" not in args.skip else {}
    quality = quality_part(args) if "quality" not in args.skip else None
    figures, met = verdicts(results, quality)
    print("\ntargets (mean of the kept runs, default writer threads):")
    for verdict, passed in met.items():
        print(f"  [{'PASS' if passed else 'FAIL'}] {verdict}")
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("RESULT " + " ".join(f"{name}={value:.3f}" for name, value in figures.items()))
    return 0 if all(met.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
