"""Best-of-N on the tiny models (CPU): what scoring N candidates costs against making them.

32 prompts on tiny SDXL-Turbo (its tiny default size, batch 4) with the tiny HPS v2.1 stand-in
as scorer, for N in {1, 4, 8} candidates per prompt and one keeper each:

- generation: the images step (``run_candidates_step``: plan, write, run metadata);
- scoring: every candidate scored by the HPS (decode + preprocess + forward passes, the load
  excluded), what the quality step adds, then ``choose_keepers``;
- at N=4, the same step again, unchanged: the images it makes (0 expected);
- the gate: from N=1's candidates, ``min_score`` set to the median of their scores (so about half
  the prompts fail at first) with up to 8 candidates; the seeds drawn past the first.

    .venv/bin/python -m benchmarks.best_of_n [--prompts 32]

Ends with ``RESULT scorer_share_n4=<scoring s / (generation + scoring s) at N=4>
rerun_new_images=<n> keepers_per_prompt=<mean> gate_retries=<n>``. Targets: rerun 0, keepers
1.0, scorer share reported (under 0.35 on the stand-ins at N=4).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd

from imagegen_pipeline.enhancement import enhance_prompts
from imagegen_pipeline.enhancement.template import TemplateEnhancer
from imagegen_pipeline.model_resolution import resolve_model, resolve_settings
from imagegen_pipeline.project_config import ProjectConfig
from imagegen_pipeline.prompt_csv import read_prompt_csv
from imagegen_pipeline.registry import MODELS, SCORERS
from imagegen_pipeline.steps.best_of_n import policies_of, run_candidates_step
from imagegen_pipeline.steps.candidate_scores import ScoreBook, ScorerHandle, add_scorer_columns
from imagegen_pipeline.steps.images import ImagesStepContext
from imagegen_pipeline.steps.keepers import candidate_table, choose_keepers
from imagegen_pipeline.storage import Storage

SUBJECTS = ["a cat", "a dog", "a city street", "a red sky", "a portrait", "a landscape"]
STYLES = ["photo", "painting", "at night", "in the sun", "high quality", "cinematic"]


def write_csv(path: Path, prompts: int, cells: str) -> pd.DataFrame:
    lines = ["prompt_id,prompt,candidates,select,scorer,min_score"]
    for i in range(prompts):
        prompt = f"{SUBJECTS[i % len(SUBJECTS)]} {STYLES[(i // len(SUBJECTS)) % len(STYLES)]} {i}"
        lines.append(f"p{i:02d},{prompt},{cells}")
    path.write_text("\n".join(lines) + "\n")
    return enhance_prompts(read_prompt_csv(path).valid, TemplateEnhancer())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="best-of-n-bench-"))
    project = ProjectConfig(device="cpu", models_dir=str(root / "models"))
    sdxl = MODELS["sdxl_turbo"]
    settings, resolved = resolve_settings(sdxl, sdxl.settings(device="cpu"), project)
    settings = settings.model_copy(update={"batch_size": 4, "offload": "none"})
    backend = sdxl.implementation_class()(settings, model_id=resolved.model_id)
    hps_spec = SCORERS["hpsv2"]
    hps_model = resolve_model(hps_spec, "auto", project)
    hps = hps_spec.implementation_class()(
        hps_spec.settings(model=hps_model.model, device="cpu"), model_id=hps_model.model_id
    )
    handle = ScorerHandle("hpsv2", hps.model_label, hps.model_revision, lambda: hps)
    generator_load = backend.load()
    hps.load()  # both warm before timing, as in a step after the first
    print(
        f"{args.prompts} prompts, tiny SDXL-Turbo {settings.width} px batch 4, tiny HPS v2.1; "
        f"CPU. Loads (not timed below): generator {generator_load:.2f} s, "
        f"scorer {hps.load_seconds:.2f} s"
    )
    shares, kept_per_prompt, rerun_new, gate_retries = {}, [], None, None
    try:
        for n in (1, 4, 8):
            folder = root / f"n{n}"
            folder.mkdir()
            enhanced = write_csv(folder / "set.csv", args.prompts, f"{n},1,hpsv2,")
            storage = Storage(folder / "storage")
            step = ImagesStepContext(storage=storage, prompt_set="bench", run_id=f"n{n}")
            made = run_candidates_step(
                backend.target, lambda: backend, enhanced, step, {"hpsv2": handle}, log=print
            )
            generation = made.outcome.seconds
            table = pd.DataFrame([r.__dict__ for r in made.outcome.records])
            originals = dict(zip(enhanced["prompt_id"], enhanced["original_prompt"], strict=True))
            book = ScoreBook.read(storage, "bench", "sdxl_turbo")
            started = time.perf_counter()
            scored = add_scorer_columns(table, {"hpsv2": handle}, book, originals, print)
            scoring = time.perf_counter() - started
            policies = policies_of(enhanced, "sdxl_turbo", "hpsv2")
            keepers = choose_keepers(candidate_table(scored, policies))
            per_prompt = int(keepers["kept"].sum()) / args.prompts
            kept_per_prompt.append(per_prompt)
            shares[n] = scoring / (generation + scoring)
            print(
                f"N={n}: {made.outcome.generated} images in {generation:.2f} s "
                f"({made.outcome.generated / generation:.1f}/s), scored in {scoring:.2f} s "
                f"({book.computed / scoring:.1f}/s); scorer share {shares[n]:.3f}; "
                f"keepers per prompt {per_prompt:.2f}"
            )
            if n == 4:
                step = ImagesStepContext(storage=storage, prompt_set="bench", run_id="rerun")
                again = run_candidates_step(
                    backend.target, lambda: backend, enhanced, step, {"hpsv2": handle}, log=print
                )
                rerun_new = again.outcome.generated
                seconds = again.outcome.seconds
                print(f"N=4 re-run, unchanged: {rerun_new} images made in {seconds:.2f} s")
            if n == 1:  # the gate: half the first candidates under min_score
                median = statistics.median(scored["score_hpsv2"].dropna())
                gated = write_csv(folder / "set.csv", args.prompts, f"8,1,hpsv2,{median!r}")
                step = ImagesStepContext(storage=storage, prompt_set="bench", run_id="gate")
                gate = run_candidates_step(
                    backend.target, lambda: backend, gated, step, {"hpsv2": handle}, log=print
                )
                gate_retries = gate.gate_retries
                failing = sum(1 for s in scored["score_hpsv2"] if s < median)
                gate_scoring = gate.scoring_seconds
                print(
                    f"gate at the median {median:.4f}: {failing} of {args.prompts} prompts under "
                    f"it at first; {gate.rounds} rounds, {gate_retries} seeds drawn past the "
                    f"first, {gate.outcome.generated} images made in {gate.outcome.seconds:.2f} s "
                    f"of which in-step scoring {gate_scoring:.2f} s ({gate.scored_in_step} scored)"
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"RESULT scorer_share_n4={shares[4]:.3f} rerun_new_images={rerun_new} "
        f"keepers_per_prompt={statistics.mean(kept_per_prompt):.2f} gate_retries={gate_retries}"
    )


if __name__ == "__main__":
    main()
