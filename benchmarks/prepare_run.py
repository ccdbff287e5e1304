"""Memory and time of a prepare run (``prompts`` and ``enhanced_prompts``), and whether it
imports torch.

A fresh process loads the project's definitions, drops ``--sets`` CSVs of ``--rows`` varied
prompts each into a temporary prompts folder and materializes the prompts group for all of
them in one run (template enhancer, embedded instance), as the sensor's or the demo's runs do.
Counting CLIP tokens used to import torch through open_clip (1.1 GB, about 15 s of CPU per
CSV); it now uses the ``tokenizers`` library. Target: peak RSS < 500 MB, torch not imported.

    .venv/bin/python -m benchmarks.prepare_run [--sets 3] [--rows 200]
Ends with ``RESULT peak_rss_mb=... torch_imported=... seconds=...``.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

SUBJECTS = ["a cat", "a lighthouse", "a bowl of ramen", "an old café", "a clockwork owl"]
PLACES = ["on a windowsill", "in a storm", "at night in the rain", "à Paris", "in 東京"]


def write_sets(folder: Path, sets: int, rows: int) -> None:
    for index in range(sets):
        with (folder / f"set{index}.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["prompt", "style"])
            for row in range(rows):
                subject = SUBJECTS[row % len(SUBJECTS)]
                place = PLACES[(row // len(SUBJECTS)) % len(PLACES)]
                detail = ", highly detailed" * (row % 7)  # some prompts over 77 tokens
                writer.writerow([f"{subject} {place}{detail} #{row}", "cinematic"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sets", type=int, default=3)
    parser.add_argument("--rows", type=int, default=200)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prepare-run-"))
    (root / "prompts").mkdir()
    write_sets(root / "prompts", args.sets, args.rows)
    os.environ.update(
        DAGSTER_HOME=str(root / "home"),
        IMAGEGEN_PROMPTS_DIR=str(root / "prompts"),
        IMAGEGEN_STORAGE=str(root / "storage"),
        HF_HUB_OFFLINE="1",
    )
    os.environ.pop("GEMINI_API_KEY", None)
    (root / "home").mkdir()
    shutil.copyfile(
        Path(__file__).resolve().parent.parent / "dagster.yaml", root / "home/dagster.yaml"
    )

    started = time.perf_counter()
    import dagster as dg

    from imagegen_pipeline.definitions import defs
    from imagegen_pipeline.local_runner import range_tags

    names = sorted(path.stem for path in (root / "prompts").glob("*.csv"))
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("prompt_sets", names)
        result = dg.materialize(
            [*defs.assets, *(defs.asset_checks or [])],
            selection=dg.AssetSelection.groups("prompts"),
            instance=instance,
            resources=defs.resources,
            tags=range_tags(names[0], names[-1]),
        )
    seconds = time.perf_counter() - started
    assert result.success
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch_imported = "torch" in sys.modules
    print(f"{args.sets} sets x {args.rows} rows: prepare run in {seconds:.1f} s")
    print(f"peak RSS {peak_mb:.0f} MB (target < 500 MB); torch imported: {torch_imported}")
    print(
        f"RESULT peak_rss_mb={peak_mb:.0f} torch_imported={int(torch_imported)} "
        f"seconds={seconds:.1f}"
    )


if __name__ == "__main__":
    main()
