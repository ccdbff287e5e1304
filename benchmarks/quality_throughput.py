"""Throughput of the quality and clips steps on the tiny models (or real ones, see --help).

Images scored per second by the quality step's code path (``score_image_table``: decode,
pixel statistics, CLIP score vs two prompts, aesthetic aspects) against a bare open_clip loop
on the same model and batch size (decode, preprocess, encode_image, cosine with prompt
embeddings computed once). Target: bare / quality <= 1.10. Then clips per minute of the SVD
step's code path (``run_clips_step``: generate, MP4 and WebP writes).

    .venv/bin/python benchmarks/quality_throughput.py [--images 256 --side 224 --batch-size 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imagegen_pipeline.scoring.clip_scorer import ClipScorer, ClipScorerConfig
from imagegen_pipeline.scoring.quality_step import score_image_table
from imagegen_pipeline.tiny_models import build_tiny_model
from imagegen_pipeline.video.clip_generation import plan_clips, run_clips_step
from imagegen_pipeline.video.svd import SvdConfig, SvdGenerator

PROMPTS = [f"a photo of a cat number {i} in the city at night" for i in range(16)]


def make_images(folder: Path, count: int, side: int) -> pd.DataFrame:
    """``count`` PNGs of smoothed noise (compressible like pictures), as an images table."""
    rng = np.random.default_rng(0)
    rows = []
    for index in range(count):
        pixels = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize((side, side), Image.Resampling.BICUBIC)
        path = folder / f"{index:04d}.png"
        image.filter(ImageFilter.SMOOTH).save(path)
        prompt_id = f"p{index % len(PROMPTS)}"
        rows.append(
            {
                "image_id": f"id{index}",
                "prompt_id": prompt_id,
                "image_index": index,
                "prompt": PROMPTS[index % len(PROMPTS)] + ", highly detailed",
                "status": "ok",
                "path": str(path),
            }
        )
    return pd.DataFrame(rows)


def bare_loop(scorer: ClipScorer, table: pd.DataFrame, batch_size: int) -> None:
    """The least a CLIP-score loop can do with the same model, preprocessing and batch size."""
    model, preprocess, tokenizer = scorer.model, scorer.preprocess, scorer.tokenizer
    originals = [PROMPTS[int(p[1:])] for p in table["prompt_id"]]
    with torch.inference_mode():
        unique = sorted(set(originals))
        texts = F.normalize(model.encode_text(tokenizer(unique).to(scorer.device)).float(), dim=-1)
        by_prompt = dict(zip(unique, texts, strict=True))
        paths = list(table["path"])
        for start in range(0, len(paths), batch_size):
            pixels = torch.stack(
                [
                    preprocess(Image.open(p).convert("RGB"))
                    for p in paths[start : start + batch_size]
                ]
            ).to(scorer.device)
            images = F.normalize(model.encode_image(pixels).float(), dim=-1)
            prompts = torch.stack([by_prompt[p] for p in originals[start : start + batch_size]])
            (100 * (images * prompts).sum(-1)).clamp(min=0).tolist()


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--clip-model", default=None, help="open_clip model (default: tiny)")
    parser.add_argument("--svd-model", default=None, help="SVD model folder (default: tiny)")
    parser.add_argument("--models-dir", default="storage/models/tiny")
    args = parser.parse_args()

    models_dir = Path(args.models_dir)
    clip_model = (
        args.clip_model or f"local-dir:{build_tiny_model('open_clip_vit_l_14', models_dir)}"
    )
    svd_model = args.svd_model or str(build_tiny_model("svd_xt", models_dir))
    scorer = ClipScorer(
        ClipScorerConfig(model=clip_model, batch_size=args.batch_size, device=args.device)
    )
    scorer.load()
    print(f"device {scorer.device}, torch threads {torch.get_num_threads()}, model {clip_model}")

    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        (folder / "images").mkdir()
        table = make_images(folder / "images", args.images, args.side)
        originals = {f"p{i}": prompt for i, prompt in enumerate(PROMPTS)}

        def quality_step(workers: int):
            return lambda: score_image_table(scorer, table, originals, workers=workers)

        bare = lambda: bare_loop(scorer, table, args.batch_size)  # noqa: E731
        bare(), quality_step(args.workers)()  # warm up: caches, allocator, thread pool
        bare_seconds = best_of(args.repeats, bare)
        step_seconds = best_of(args.repeats, quality_step(args.workers))
        serial_seconds = best_of(args.repeats, quality_step(0))
        n = args.images
        print(
            f"\n{n} images of {args.side}px, batch size {args.batch_size}, best of {args.repeats}:"
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
        print("  target: quality step time vs bare <= 1.10")

        config = SvdConfig(
            model=svd_model,
            width=64,
            height=64,
            num_frames=4,
            steps=2,
            decode_chunk_size=4,
            device=args.device,
        )
        generator = SvdGenerator(config)
        sources = table.head(args.clips).assign(sha256=None)
        planned = plan_clips(sources, generator, folder / "clips")
        generator.load()
        warm = plan_clips(table.tail(1).assign(sha256=None), generator, folder / "warm")
        run_clips_step(
            generator,
            warm,
            clips_dir=folder / "warm",
            prompt_set="bench",
            backend="x",
            run_id="warm",
            log=lambda m: None,
        )
        started = time.perf_counter()
        outcome = run_clips_step(
            generator,
            planned,
            clips_dir=folder / "clips",
            prompt_set="bench",
            backend="x",
            run_id="bench",
            log=lambda m: None,
        )
        seconds = time.perf_counter() - started
        made = outcome.counts["ok"]
        print(
            f"\nSVD clips ({config.width}x{config.height}, {config.num_frames} frames, "
            f"{config.steps} steps, MP4 + WebP): {made} in {seconds:.1f} s = "
            f"{60 * made / seconds:.1f} clips/min"
        )


if __name__ == "__main__":
    main()
