"""Throughput of the quality and video clip steps on the tiny models (or real ones, see --help).

Images scored per second by the quality step's code path (``score_image_table``: read,
decode, pixel statistics, CLIP score against two prompts, aesthetic aspects), against a bare
open_clip loop on the same model and batch size (decode, preprocess, encode_image, cosine with
prompt embeddings computed once). The images are the photographic test images of
``tests.support.accelerator.PhotoSource``. Target: quality time / bare time <= 1.10.
Then video clips per minute of the SVD step's code path (``run_video_step``: generate, MP4 and
WebP writes).

    .venv/bin/python -m benchmarks.quality_throughput [--images 256 --side 224 --batch-size 32]
Ends with ``RESULT quality_vs_bare=... quality_images_per_second=... bare_images_per_second=...
clips_per_minute=...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from imagegen_pipeline.registry import MODELS, SVD
from imagegen_pipeline.scoring.clip_model import ClipModel, ClipModelSettings
from imagegen_pipeline.steps.clips import VideoStepContext, plan_video_clips, run_video_step
from imagegen_pipeline.steps.scores import Scorer, score_image_table
from imagegen_pipeline.storage import Storage
from imagegen_pipeline.tiny_models import build_tiny_model
from imagegen_pipeline.video.svd import SvdGenerator, SvdSettings
from tests.support.accelerator import PhotoSource

PROMPTS = [f"a photo of a cat number {i} in the city at night" for i in range(16)]
MAX_TIME_VS_BARE = 1.10
QUIET: Callable[[str], None] = lambda message: None  # noqa: E731


def make_images(folder: Path, count: int, side: int) -> pd.DataFrame:
    """``count`` photographic PNGs of ``side`` px, as an images table."""
    photos = PhotoSource()
    rows = []
    for index in range(count):
        path = folder / f"{index:04d}.png"
        photos.photo(side, side, key=str(index)).save(path)
        rows.append(
            {
                "image_id": f"id{index}",
                "prompt_id": f"p{index % len(PROMPTS)}",
                "image_index": index,
                "prompt": PROMPTS[index % len(PROMPTS)] + ", highly detailed",
                "status": "ok",
                "path": str(path),
            }
        )
    return pd.DataFrame(rows)


def bare_loop(model: ClipModel, table: pd.DataFrame, batch_size: int) -> None:
    """The least a CLIP-score loop can do with the same model, preprocessing and batch size."""
    clip, preprocess, tokenizer = model.model, model.preprocess, model.tokenizer
    originals = [PROMPTS[int(p[1:])] for p in table["prompt_id"]]
    with torch.inference_mode():
        unique = sorted(set(originals))
        texts = F.normalize(clip.encode_text(tokenizer(unique).to(model.device)).float(), dim=-1)
        by_prompt = dict(zip(unique, texts, strict=True))
        paths = list(table["path"])
        for start in range(0, len(paths), batch_size):
            pixels = torch.stack(
                [
                    preprocess(Image.open(p).convert("RGB"))
                    for p in paths[start : start + batch_size]
                ]
            ).to(model.device)
            images = F.normalize(clip.encode_image(pixels).float(), dim=-1)
            prompts = torch.stack([by_prompt[p] for p in originals[start : start + batch_size]])
            (100 * (images * prompts).sum(-1)).clamp(min=0).tolist()


def best_of(repeats: int, run: Callable[[], object]) -> float:
    """The shortest of ``repeats`` timed runs."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> int:
    """Both measurements; 0 when the quality step's target is met."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=ClipModelSettings().workers)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--clip-model", default=None, help="open_clip model (default: tiny)")
    parser.add_argument("--svd-model", default=None, help="SVD model folder (default: tiny)")
    parser.add_argument("--models-dir", default="storage/models/tiny")
    args = parser.parse_args()

    models_dir = Path(args.models_dir)
    clip_model = (
        args.clip_model or f"local-dir:{build_tiny_model(MODELS['clip_model'], models_dir)}"
    )
    svd_model = args.svd_model or str(build_tiny_model(MODELS["svd"], models_dir))
    model = ClipModel(
        ClipModelSettings(model=clip_model, batch_size=args.batch_size, device=args.device)
    )
    model.load()
    print(
        f"device {model.device}, torch threads {torch.get_num_threads()}, {os.cpu_count()} cores, "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}, model {clip_model}"
    )

    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        storage = Storage(folder)
        (folder / "images").mkdir()
        table = make_images(folder / "images", args.images, args.side)
        originals = {f"p{i}": prompt for i, prompt in enumerate(PROMPTS)}

        def quality_step(workers: int) -> Callable[[], object]:
            return lambda: score_image_table(
                Scorer.of(model), table, originals, storage=storage, workers=workers, log=QUIET
            )

        bare = lambda: bare_loop(model, table, args.batch_size)  # noqa: E731
        bare(), quality_step(args.workers)()  # warm up: caches, allocator, thread pool
        bare_seconds = best_of(args.repeats, bare)
        step_seconds = best_of(args.repeats, quality_step(args.workers))
        serial_seconds = best_of(args.repeats, quality_step(0))
        n = args.images
        print(
            f"\n{n} photos of {args.side}px, batch size {args.batch_size}, best of {args.repeats}:"
        )
        for label, seconds in [
            ("bare open_clip loop (CLIP score only)", bare_seconds),
            (f"quality step, {args.workers} workers (all scores)", step_seconds),
            ("quality step, no workers (all scores)", serial_seconds),
        ]:
            print(
                f"  {label:<40} {n / seconds:8.1f} images/s, "
                f"time vs bare {seconds / bare_seconds:.3f}"
            )
        print(f"  target: quality step time vs bare <= {MAX_TIME_VS_BARE}")

        settings = SvdSettings(model=svd_model, device=args.device, **SVD.tiny_defaults)
        generator = SvdGenerator(settings)
        generator.load()
        sources = table.head(args.clips)
        warm = VideoStepContext(storage, "warm", "x", "warm")
        clip_settings = generator.settings
        warm_up = plan_video_clips(table.tail(1), clip_settings)
        run_video_step(clip_settings, lambda: generator, warm_up, warm, QUIET)
        planned = plan_video_clips(sources, clip_settings)
        started = time.perf_counter()
        outcome = run_video_step(
            clip_settings,
            lambda: generator,
            planned,
            VideoStepContext(storage, "bench", "x", "bench"),
            QUIET,
        )
        seconds = time.perf_counter() - started
        made = outcome.counts.get("ok", 0)
        clips_per_minute = 60 * made / seconds
        print(
            f"\nSVD clips ({settings.width}x{settings.height}, {settings.num_frames} frames, "
            f"{settings.steps} steps, MP4 + WebP): {made} in {seconds:.1f} s = "
            f"{clips_per_minute:.1f} clips/min"
        )
    ratio = step_seconds / bare_seconds
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(
        f"RESULT quality_vs_bare={ratio:.3f} quality_images_per_second={n / step_seconds:.1f} "
        f"bare_images_per_second={n / bare_seconds:.1f} clips_per_minute={clips_per_minute:.1f}"
    )
    return 0 if ratio <= MAX_TIME_VS_BARE else 1


if __name__ == "__main__":
    sys.exit(main())
