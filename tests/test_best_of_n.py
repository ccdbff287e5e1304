"""Best-of-N: the CSV columns, candidates drawn in rounds behind a gate, and the keepers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from imagegen_pipeline.backends import diffusers_text_to_image
from imagegen_pipeline.enhancement import enhance_prompts
from imagegen_pipeline.enhancement.template import TemplateEnhancer
from imagegen_pipeline.model_resolution import resolve_settings
from imagegen_pipeline.project_config import ProjectConfig
from imagegen_pipeline.prompt_csv import read_prompt_csv
from imagegen_pipeline.registry import MODELS, SCORERS
from imagegen_pipeline.run_metadata import load_run_metadata
from imagegen_pipeline.steps.best_of_n import CandidatePolicy, candidate_policy, run_candidates_step
from imagegen_pipeline.steps.candidate_scores import (
    ScoreBook,
    ScorerHandle,
    place_scorer,
    room_for_gate,
)
from imagegen_pipeline.steps.images import ImagesStepContext, derive_seed
from imagegen_pipeline.steps.keepers import choose_keepers
from imagegen_pipeline.storage import Storage
from imagegen_pipeline.tiny_models import build_tiny_model
from tests.support.loras import make_lora

SIDE = 64
PROMPTS = ["a red cat", "a blue dog", "a city street at night", "the sun in a green sky",
           "a portrait of a man", "a white light on a black street"]  # fmt: skip


# --- the CSV columns ------------------------------------------------------------------------


def test_best_of_n_columns_are_checked_and_defaulted(tmp_path: Path) -> None:
    csv = tmp_path / "set.csv"
    csv.write_text(
        "prompt_id,prompt,candidates,select,scorer,min_score,num_images\n"
        "a,a cat,8,2,hpsv2,0.25,\n"
        "b,a dog,,,,,3\n"
        "c,a sky,2,3,,,\n"
        "d,a sun,,,nope,,\n"
        "e,a man,65,,,,\n"
        "f,a sun,4,1,imagereward,,\n"
    )
    table = read_prompt_csv(csv)
    rows = {row["prompt_id"]: row for row in table.valid.to_dict("records")}
    assert candidate_policy(rows["a"], "clip") == CandidatePolicy(8, 2, "hpsv2", 0.25)
    # Empty cells: every image made is kept, as before best-of-N; the default scorer.
    assert candidate_policy(rows["b"], "clip") == CandidatePolicy(3, 3, "clip", None)
    assert candidate_policy(rows["f"], "clip") == CandidatePolicy(4, 1, "imagereward", None)
    reasons = {(r["line"], r["field"]): r["reason"] for r in table.rejected.to_dict("records")}
    assert "candidates (2) must be at least select (3)" in reasons[(4, "row")]
    assert "unknown scorer 'nope'" in reasons[(5, "scorer")]
    assert "candidates must be between 1 and 64" in reasons[(6, "candidates")]


def test_a_sidecar_gives_the_set_its_best_of_n(tmp_path: Path) -> None:
    (tmp_path / "set.csv").write_text("prompt_id,prompt,candidates\na,a cat,\nb,a dog,2\n")
    (tmp_path / "set.toml").write_text('candidates = 4\nscorer = "pickscore"\nmin_score = 20.5\n')
    rows = read_prompt_csv(tmp_path / "set.csv").valid.set_index("prompt_id")
    assert list(rows["candidates"]) == [4, 2]
    assert set(rows["scorer"]) == {"pickscore"} and set(rows["min_score"]) == {20.5}


# --- choose_keepers, the pure function ------------------------------------------------------


def candidates(scores: dict[str, list[float | None]], select: int = 1, gate=None) -> pd.DataFrame:
    rows = []
    for prompt, values in scores.items():
        for index, score in enumerate(values):
            rows.append(
                {
                    "image_id": f"{prompt}{index}",
                    "prompt_id": prompt,
                    "candidate_index": index,
                    "status": "ok" if score is not None else "failed",
                    "is_blank": False,
                    "path": f"/{prompt}{index}.png",
                    "scorer": "hpsv2",
                    "score": score,
                    "select": select,
                    "min_score": gate,
                }
            )
    return pd.DataFrame(rows)


def test_the_best_candidates_are_kept_and_every_one_says_why() -> None:
    table = choose_keepers(candidates({"p": [0.2, 0.3, None, 0.25]}, select=2)).set_index(
        "image_id"
    )
    assert list(table.loc[["p1", "p3"], "kept"]) == [True, True]
    assert not table.loc["p0", "kept"] and not table.loc["p2", "kept"]
    assert list(table.loc[["p1", "p3", "p0"], "rank"]) == [1, 2, 3]
    assert pd.isna(table.loc["p2", "rank"]) and table.loc["p2", "reason"] == "not made: failed"
    assert table.loc["p1", "reason"].startswith("rank 1 of 3 by hpsv2 (0.3")
    assert "2 keeper(s) wanted" in table.loc["p0", "reason"]
    assert not table["below_gate"].any()


def test_a_prompt_with_no_candidate_over_the_gate_keeps_its_best_flagged() -> None:
    table = choose_keepers(candidates({"p": [0.1, 0.2], "q": [0.5, 0.1]}, gate=0.3))
    kept = table[table["kept"]].set_index("prompt_id")
    assert list(kept["image_id"]) == ["p1", "q0"]
    assert bool(kept.loc["p", "below_gate"]) and not kept.loc["q", "below_gate"]
    assert "under the gate 0.3" in kept.loc["p", "reason"]


def test_reviewer_verdicts_override_the_scorer() -> None:
    verdicts = pd.DataFrame({"image_id": ["p2", "q0"], "verdict": ["keep", "reject"]})
    table = choose_keepers(candidates({"p": [0.9, 0.5, 0.1], "q": [0.9, 0.5]}), verdicts)
    kept = table[table["kept"]].set_index("prompt_id")
    assert list(kept["image_id"]) == ["p2", "q1"]  # a kept low scorer; the next best for q
    assert kept.loc["p", "reason"] == "kept by the reviewer"
    assert table.set_index("image_id").loc["q0", "reason"] == "rejected by the reviewer"
    with pytest.raises(ValueError, match="unknown verdict"):
        choose_keepers(
            candidates({"p": [0.1]}), pd.DataFrame({"image_id": ["p0"], "verdict": ["meh"]})
        )


# --- candidates in rounds, on tiny SDXL-Turbo and the tiny HPS ------------------------------


@pytest.fixture(scope="module")
def tiny_hpsv2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(MODELS["hpsv2"], tmp_path_factory.mktemp("tiny-hps"))


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl: Path):
    spec = MODELS["sdxl_turbo"]
    settings = spec.settings(model=str(tiny_sdxl), device="cpu", width=SIDE, height=SIDE)
    concrete, resolved = resolve_settings(spec, settings, ProjectConfig(device="cpu"))
    concrete = concrete.model_copy(update={"batch_size": 4, "offload": "none"})
    return spec.implementation_class()(concrete, model_id=resolved.model_id)


@pytest.fixture(scope="module")
def hps(tiny_hpsv2: Path) -> ScorerHandle:
    scorer = SCORERS["hpsv2"].implementation_class()(
        SCORERS["hpsv2"].settings(model=str(tiny_hpsv2), device="cpu"), model_id="tiny-hps"
    )
    return ScorerHandle("hpsv2", "tiny-hps", "main", lambda: scorer)


def enhanced(folder: Path, header: str, cells: str) -> pd.DataFrame:
    csv = folder / "set.csv"
    lines = [f"p{i},{prompt},7,{cells}" for i, prompt in enumerate(PROMPTS)]
    csv.write_text(f"prompt_id,prompt,seed,{header}\n" + "\n".join(lines) + "\n")
    return enhance_prompts(read_prompt_csv(csv).valid, TemplateEnhancer())


def run(sdxl, hps, table: pd.DataFrame, storage: Storage, run_id: str):
    where = ImagesStepContext(storage=storage, prompt_set="set", run_id=run_id)
    return run_candidates_step(
        sdxl.target, lambda: sdxl, table, where, {"hpsv2": hps}, default_scorer="hpsv2", log=print
    )


def test_a_gate_draws_new_seeds_until_one_passes_and_a_rerun_makes_nothing(
    tmp_path: Path, sdxl, hps
) -> None:
    storage = Storage(str(tmp_path / "storage"))
    # Candidate 0 of each prompt, scored: the gate is their median, so about half fail.
    first = run(sdxl, hps, enhanced(tmp_path, "candidates", "1"), storage, "r0")
    book = ScoreBook.read(storage, "set", "sdxl_turbo")
    assert first.rounds == 1 and first.gate_retries == 0 and len(book.rows) == 0  # no gate
    items = [
        {**r.__dict__, "score_prompt": p}
        for r, p in zip(first.outcome.records, PROMPTS, strict=True)
    ]
    firsts = book.score(items, hps)
    gate = float(pd.Series(list(firsts.values())).median())
    failing = {r.prompt_id for r in first.outcome.records if firsts[r.image_id] < gate}
    assert 0 < len(failing) < len(PROMPTS)

    gated = enhanced(tmp_path, "candidates,scorer,min_score", f"4,hpsv2,{gate}")
    book.save()
    second = run(sdxl, hps, gated, storage, "r1")
    drawn = pd.Series([r.prompt_id for r in second.outcome.records]).value_counts()
    assert set(drawn[drawn > 1].index) == failing  # only prompts under the gate drew more
    assert second.gate_retries == int(drawn.sum()) - len(PROMPTS) >= len(failing)
    assert second.outcome.counts["skipped_existing"] == len(PROMPTS)  # candidate 0 reused
    for record in second.outcome.records:  # seeds from (row seed, candidate index)
        assert record.seed == derive_seed(record.prompt_id, record.image_index, 7)

    loads = hps.model().model_loads
    again = run(sdxl, hps, gated, storage, "r2")
    assert again.outcome.generated == 0 and again.gate_retries == second.gate_retries
    assert hps.model().model_loads == loads and again.scored_in_step == 0  # from the book
    assert [r.image_id for r in again.outcome.records] == [
        r.image_id for r in second.outcome.records
    ]
    # A later-round candidate lost (a kill before its write): only it is made again.
    retried = next(r for r in second.outcome.records if r.image_index > 0)
    Path(retried.path).unlink()
    resumed = run(sdxl, hps, gated, storage, "r3")
    assert resumed.outcome.generated == 1
    rows = load_run_metadata(storage.base, "images", prompt_set="set", backend="sdxl_turbo")
    assert rows["image_id"].is_unique and len(rows) == len(second.outcome.records)


def test_rounds_reuse_the_loaded_lora_and_the_step_reports_every_rounds_work(
    tmp_path: Path, sdxl, hps, tiny_sdxl: Path
) -> None:
    # Each round is a generate call: a gate no candidate passes spends every round. The
    # row's LoRA is read once, in the first round, and the later rounds switch to it; the
    # step row counts every round's work, not only the last call's.
    lora = make_lora("sdxl_turbo", tiny_sdxl, tmp_path / "style", seed=1)
    table = enhanced(
        tmp_path, "candidates,scorer,min_score,lora,backends", f"3,hpsv2,1000000,{lora},sdxl_turbo"
    )
    result = run(sdxl, hps, table, Storage(str(tmp_path / "storage")), "r0")
    assert result.rounds == 3 and result.outcome.generated == 3 * len(PROMPTS)
    last_call = sdxl.run_summary().metadata
    assert last_call["adapter_loads"] == 0  # the last round switched to what was loaded
    assert result.summary.metadata["adapter_loads"] == 1  # the first round's, counted
    assert result.summary.metadata["adapter_switches"] >= 1
    assert result.summary.metadata["batch_size"] == sdxl.run_summary().metadata["batch_size"]


def test_retry_rounds_draw_only_what_the_rest_of_the_run_budget_pays_for() -> None:
    from types import SimpleNamespace

    from imagegen_pipeline.steps.best_of_n import CandidatesOutcome, _spend_within_budget
    from imagegen_pipeline.steps.skeleton import StepOutcome

    gemini = SimpleNamespace(budget_usd=0.20, price_per_image_usd=0.04)
    spent = {("a", 0): SimpleNamespace(cost_usd=0.04), ("b", 0): SimpleNamespace(cost_usd=0.04)}
    drawn, since = {"a": 3, "b": 4}, {"a": 1, "b": 1}  # the gate asks for 2 + 3 more
    result = CandidatesOutcome(StepOutcome([]), {})
    _spend_within_budget(drawn, since, gemini, spent, result)
    assert drawn == {"a": 3, "b": 2} and result.budget_stopped == ["b"]  # $0.12 left: 3 images
    local = SimpleNamespace()  # no budget: nothing cut
    drawn = {"a": 3}
    _spend_within_budget(drawn, {"a": 1}, local, spent, result)
    assert drawn == {"a": 3}


def test_a_partition_without_candidates_keeps_nothing() -> None:
    table = choose_keepers(pd.DataFrame())
    assert table.empty and {"kept", "rank", "reason", "image_id"} <= set(table.columns)


def test_an_ungated_ranking_scores_in_the_images_step_only_where_the_scorer_fits(
    tmp_path: Path, tiny_sdxl: Path, sdxl, hps
) -> None:
    spec = MODELS["sdxl_turbo"]
    settings = spec.settings(model=str(tiny_sdxl), device="cpu", width=SIDE, height=SIDE)
    concrete, resolved = resolve_settings(spec, settings, ProjectConfig(device="cpu"))
    planned_sdxl = spec.implementation_class()(concrete, model_id=resolved.model_id)
    assert concrete.offload == "auto" and concrete.batch_size is None  # the planner decides
    table = enhanced(tmp_path, "candidates,scorer", "3,hpsv2")
    storage = Storage(str(tmp_path / "storage"))
    where = ImagesStepContext(storage=storage, prompt_set="set", run_id="r0")

    result = run_candidates_step(
        planned_sdxl.target, lambda: planned_sdxl, table, where, {"hpsv2": hps}, log=print
    )

    # Host memory holds the tiny generator and the tiny HPS: scored here, all 18 candidates.
    placement = result.placements["hpsv2"]
    assert placement.startswith("images step: hpsv2 ") and " fits beside " in placement
    assert result.outcome.generated == result.scored_in_step == 3 * len(PROMPTS)
    assert len(ScoreBook.read(storage, "set", "sdxl_turbo").rows) == 3 * len(PROMPTS)
    # Where the generator's plan leaves less room than the scorer's weights: the quality step.
    plan = planned_sdxl.memory_plan
    scorer_bytes = hps.model().planned_weight_bytes()
    tight = replace(plan, free_bytes=plan.reserve_bytes + plan.peak_bytes + scorer_bytes // 2)
    fits, why = place_scorer(SimpleNamespace(memory_plan=tight), hps)
    assert not fits and "does not fit beside the generator's planned peak" in why
    # Offload and batch size set by hand: no plan to place by, so the quality step scores.
    other = Storage(str(tmp_path / "other"))
    where = ImagesStepContext(storage=other, prompt_set="set", run_id="r1")
    by_hand = run_candidates_step(sdxl.target, lambda: sdxl, table, where, {"hpsv2": hps})
    assert by_hand.placements["hpsv2"].startswith("quality step: no memory plan")
    assert by_hand.scored_in_step == 0 and not ScoreBook.read(other, "set", "sdxl_turbo").rows


def test_the_generator_plans_room_for_the_gates_scorer(
    tmp_path: Path, tiny_sdxl: Path, tiny_hpsv2: Path, monkeypatch
) -> None:
    # A device stand-in of 6 GiB free: the planner sees it less the scorer's weights.
    free = 6 * 2**30
    monkeypatch.setattr(diffusers_text_to_image, "free_memory_bytes", lambda device: free)
    spec = MODELS["sdxl_turbo"]
    settings = spec.settings(model=str(tiny_sdxl), device="cpu", width=SIDE, height=SIDE)
    concrete, resolved = resolve_settings(spec, settings, ProjectConfig(device="cpu"))
    generator = spec.implementation_class()(concrete, model_id=resolved.model_id)
    scorer = SCORERS["hpsv2"].implementation_class()(
        SCORERS["hpsv2"].settings(model=str(tiny_hpsv2), device="cpu"), model_id="tiny-hps"
    )
    fresh = ScorerHandle("hpsv2", "tiny-hps", "main", lambda: scorer)
    scorer_bytes = scorer.planned_weight_bytes()
    gated = enhanced(tmp_path, "candidates,scorer,min_score", "2,hpsv2,-1")  # every image passes
    where = ImagesStepContext(storage=Storage(str(tmp_path / "s")), prompt_set="set", run_id="r")

    result = run_candidates_step(
        generator.target, lambda: generator, gated, where, {"hpsv2": fresh}
    )

    assert result.scored_in_step == len(PROMPTS) and scorer.model is not None
    assert generator.room_for_others == scorer_bytes > 0
    assert generator.memory_plan.free_bytes == free - scorer_bytes
    # Once the scorer is loaded, the device's free memory shows it: no room is counted twice.
    assert room_for_gate([fresh]) == 0
