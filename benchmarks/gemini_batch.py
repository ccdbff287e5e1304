"""Gemini batch mode: 500 images, the step killed while it waits, then run again.

Against ``tests.support.fake_gemini_batch.FakeGeminiBatch`` on 127.0.0.1 (the real google-genai
client, the documented REST shapes; jobs stay PENDING, then RUNNING, on a timer):

1. a child process runs the images step of one prompt set of 500 images in batch mode
   (``batch_max_requests`` 100: 5 jobs) and is killed with SIGKILL once every job is recorded
   and it is polling;
2. a second child runs the same step: it must resume the recorded jobs, submit nothing, and
   write every image;
3. the same 500 images online, for the cost ratio.

Targets: resubmitted after the kill 0, images lost 0, batch cost / online cost 0.5.

    .venv/bin/python -m benchmarks.gemini_batch [--images 500]

Ends with ``RESULT batch_jobs_created=<n> resubmitted_after_kill=<n> images_lost=<n>
cost_ratio_vs_online=<r>``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imagegen_pipeline.backends.base import ImageRequest
from imagegen_pipeline.backends.gemini.backend import GeminiBackend
from imagegen_pipeline.backends.gemini.settings import GeminiSettings
from imagegen_pipeline.steps.images import (
    ImagesStepContext,
    PlannedImage,
    content_address,
    derive_seed,
    run_images_step,
)
from imagegen_pipeline.storage import Storage
from tests.support.fake_gemini_batch import FakeGeminiBatch
from tests.support.fake_servers import FAKE_GEMINI_KEY

ROOT = Path(__file__).resolve().parent.parent
PENDING_SECONDS = 4.0  # each job's timer: PENDING, then RUNNING, then SUCCEEDED
RUNNING_SECONDS = 4.0
JOB_SIZE = 100


def settings(url: str, mode: str) -> GeminiSettings:
    return GeminiSettings(
        api_key=FAKE_GEMINI_KEY,
        base_url=url,
        mode=mode,  # type: ignore[arg-type]
        requests_per_minute=60_000,
        max_concurrent_requests=16,
        timeout_seconds=30.0,
        batch_max_requests=JOB_SIZE,
        batch_poll_seconds=0.5,
        batch_wait_seconds=600.0,
    )


def planned_images(backend: GeminiBackend, count: int) -> list[PlannedImage]:
    planned = []
    for index in range(count):
        prompt_id = f"p{index:04d}"
        request = ImageRequest(
            prompt_id=prompt_id,
            image_index=0,
            prompt=f"a harbour at dusk, boat number {index}",
            negative_prompt="",
            seed=derive_seed(prompt_id, 0),
            width=1024,
            height=1024,
        )
        image_id = content_address(backend.settings, request)
        planned.append(PlannedImage(request, image_id, f"{prompt_id}/00_{image_id[:16]}.png"))
    return planned


def child(url: str, mode: str, storage: str, count: int, run_id: str) -> None:
    """One images step; prints its counts and cost as JSON on the last line."""
    backend = GeminiBackend(settings(url, mode))
    kind = None
    if mode == "batch":
        from imagegen_pipeline.steps.gemini_batch import BatchImagesKind

        kind = BatchImagesKind
    step = ImagesStepContext(storage=Storage(storage), prompt_set="bench", run_id=run_id)
    outcome = run_images_step(
        backend.target,
        lambda: backend,
        planned_images(backend, count),
        step,
        log=lambda line: print(line, flush=True),
        kind=kind,
    )
    cost = sum(record.cost_usd or 0.0 for record in outcome.records)
    print(json.dumps({"counts": outcome.counts, "cost_usd": cost}), flush=True)


def start_child(url: str, mode: str, storage: Path, count: int, run_id: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "benchmarks.gemini_batch", "--child", url, mode]
    command += [str(storage), str(count), run_id]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> dict:
    out, _ = process.communicate(timeout=900)
    if process.returncode != 0:
        raise SystemExit(f"child failed ({process.returncode}):\n{out[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--child", nargs=5, metavar=("URL", "MODE", "STORAGE", "N", "RUN"))
    args = parser.parse_args()
    if args.child:
        url, mode, storage, count, run_id = args.child
        child(url, mode, storage, int(count), run_id)
        return
    count = args.images
    jobs_expected = -(-count // JOB_SIZE)
    with (
        tempfile.TemporaryDirectory() as folder,
        FakeGeminiBatch(
            api_key=FAKE_GEMINI_KEY,
            pending_seconds=PENDING_SECONDS,
            running_seconds=RUNNING_SECONDS,
        ) as server,
    ):
        batch_storage = Path(folder) / "batch"
        started = time.perf_counter()
        first = start_child(server.url, "batch", batch_storage, count, "run-killed")
        assert first.stdout is not None
        polling_lines = 0
        for line in first.stdout:  # wait until every job is recorded and it is polling
            print(f"  [first run] {line.rstrip()}")
            if "job(s) open after" in line:
                polling_lines += 1
                if polling_lines >= 2:
                    break
        first.send_signal(signal.SIGKILL)
        first.wait()
        created_before_kill = server.batch_creates
        killed_at = time.perf_counter() - started
        print(f"killed the first run after {killed_at:.1f} s: {created_before_kill} job(s)")

        second = start_child(server.url, "batch", batch_storage, count, "run-resumed")
        resumed = finish(second)
        batch_seconds = time.perf_counter() - started
        resubmitted = server.batch_creates - created_before_kill
        pngs = len(list(batch_storage.rglob("*.png")))
        ok = resumed["counts"].get("ok", 0)
        lost = count - pngs
        print(f"resumed run: {resumed['counts']}, ${resumed['cost_usd']:.4f}, {pngs} PNGs")
        timers = PENDING_SECONDS + RUNNING_SECONDS
        print(f"batch mode: {batch_seconds:.1f} s wall (each job {timers:g} s on its timers)")

        online_started = time.perf_counter()
        online = finish(
            start_child(server.url, "online", Path(folder) / "online", count, "run-online")
        )
        print(
            f"online: {online['counts']}, ${online['cost_usd']:.4f}, "
            f"{time.perf_counter() - online_started:.1f} s"
        )
    ratio = resumed["cost_usd"] / online["cost_usd"] if online["cost_usd"] else float("nan")
    print(f"jobs: {server.batch_creates} created (expected {jobs_expected}); ok {ok} of {count}")
    print(
        f"RESULT batch_jobs_created={server.batch_creates} resubmitted_after_kill={resubmitted} "
        f"images_lost={lost} cost_ratio_vs_online={ratio:.3f}"
    )
    if resubmitted or lost or abs(ratio - 0.5) > 0.01:
        sys.exit(1)


if __name__ == "__main__":
    main()
