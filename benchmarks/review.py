"""The review app on a 2,000-image prompt set: thumbnails, the first page, a verdict.

1. A set of ``--images`` SDXL-Turbo-sized images (512 px, 8 per prompt) is made by the real
   images step around the accelerator stand-in (photographic pixels, real PNGs and rows).
2. Thumbnails: every image's 256 px WebP made by ``build_thumbnails`` (its default threads),
   from nothing: images per second.
3. First page: a new app (nothing cached, as after ``imagegen review`` starts) serves the set's
   first page (120 cards: run metadata, scores, clips and verdicts read, filtered, rendered),
   5 times; the median. Also the same page warm, and the first page's 120 thumbnails fetched.
4. Verdicts: ``--verdicts`` keeps and rejects posted to the app's API (each validated and
   appended as its own Parquet part); the median time of one.

Targets (issue 18): first page < 1,000 ms, a verdict < 100 ms on this machine.

    .venv/bin/python -m benchmarks.review [--images 2000] [--verdicts 50]
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

from starlette.testclient import TestClient

from imagegen_pipeline.review_app import create_app
from imagegen_pipeline.run_metadata import load_run_metadata
from imagegen_pipeline.steps.images import ImagesStepContext, plan_images, run_images_step
from imagegen_pipeline.storage import Storage
from imagegen_pipeline.thumbnails import DEFAULT_THUMBNAIL_THREADS, build_thumbnails
from tests.support.accelerator import AcceleratorStandIn, enhanced_prompts

SIDE = 512
PER_PROMPT = 8
SET = "bench"


def make_set(storage: Storage, images: int) -> float:
    """``images`` images of one set through the real images step; returns its seconds."""
    backend = AcceleratorStandIn("sdxl_turbo", batch_size=8, seconds_per_image=0.0)
    prompts = enhanced_prompts(
        images // PER_PROMPT, ["sdxl_turbo"], images_each=PER_PROMPT, width=SIDE, height=SIDE
    )
    planned = plan_images(prompts, backend.target)
    started = time.perf_counter()
    step = ImagesStepContext(storage, SET, "bench-run")
    outcome = run_images_step(backend.target, lambda: backend, planned, step, log=lambda _: None)
    assert outcome.counts.get("ok") == len(planned), outcome.counts
    return time.perf_counter() - started


def timed_ms(action) -> float:
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--verdicts", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="review-bench-") as folder:
        storage = Storage(Path(folder) / "storage")
        made = make_set(storage, args.images)
        print(f"set: {args.images} images of {SIDE} px made in {made:.1f} s")
        rows = load_run_metadata(storage, "images", prompt_set=SET)
        wanted = [
            (SET, b, i, p) for b, i, p in zip(rows.backend, rows.image_id, rows.path, strict=True)
        ]
        started = time.perf_counter()
        count = build_thumbnails(storage, wanted)
        seconds = time.perf_counter() - started
        thumbs_per_s = count / seconds
        print(
            f"thumbnails: {count} in {seconds:.1f} s = {thumbs_per_s:.1f}/s "
            f"({DEFAULT_THUMBNAIL_THREADS} threads, 2 cores)"
        )
        assert build_thumbnails(storage, wanted) == 0  # made once

        first = []
        for _ in range(5):
            client = TestClient(create_app(storage))  # a new app: nothing cached
            first.append(timed_ms(lambda c=client: c.get(f"/sets/{SET}").raise_for_status()))
        warm = [timed_ms(lambda: client.get(f"/sets/{SET}").raise_for_status()) for _ in range(5)]
        page = client.get(f"/sets/{SET}").text
        thumbs = re.findall(r'src="(/thumbs/[^"]+)"', page)

        def fetch_thumbs() -> None:
            for url in thumbs:
                client.get(url).raise_for_status()

        thumbs_ms = timed_ms(fetch_thumbs)
        first_page_ms = statistics.median(first)
        print(
            f"first page ({len(thumbs)} cards): median {first_page_ms:.0f} ms of 5 new apps "
            f"({', '.join(f'{t:.0f}' for t in first)}); warm {statistics.median(warm):.0f} ms; "
            f"its {len(thumbs)} thumbnails {thumbs_ms:.0f} ms"
        )

        image_ids = list(rows.image_id[: args.verdicts])
        writes = []
        for number, image_id in enumerate(image_ids):
            body = {
                "prompt_set": SET,
                "backend": "sdxl_turbo",
                "image_id": image_id,
                "verdict": "reject" if number % 2 else "keep",
            }
            writes.append(
                timed_ms(lambda b=body: client.post("/api/verdicts", json=b).raise_for_status())
            )
        verdict_ms = statistics.median(writes)
        print(
            f"verdicts: {len(writes)} posted, median {verdict_ms:.1f} ms, max {max(writes):.1f} ms"
        )
        after = timed_ms(lambda: client.get(f"/sets/{SET}").raise_for_status())
        print(f"page after {len(writes)} verdicts: {after:.0f} ms")
    print(
        f"RESULT thumbs_per_s={thumbs_per_s:.1f} first_page_ms={first_page_ms:.0f} "
        f"verdict_write_ms={verdict_ms:.1f}"
    )


if __name__ == "__main__":
    main()
