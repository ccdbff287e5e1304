"""Best-of-N with a gate, Dagster-free: how many candidates each prompt draws, in rounds.

A prompt row asks for ``select`` keepers (default ``num_images``) out of at most ``candidates``
images (N, default ``select``: every image made is kept, as before best-of-N existed), ranked by
``scorer``; with ``min_score`` set, a gate. Candidate *i* of a prompt is its image index *i*,
whose seed is derived from (the row's seed, *i*) like any image's, so a candidate's content
address never depends on the round that drew it: a re-run, or a run resumed after a kill, finds
every candidate made before and makes only the missing ones.

- Without a gate every prompt draws its N candidates at once, so the backend batches across
  prompts, and the ``keepers`` asset ranks them by scores from the score book. Those scores
  are computed at the end of this step when the scorer fits on the device beside the
  generator (its memory plan decides; the images are still warm and the device is ours),
  else by the quality step, which loads the scorer on its own.
- With a gate a prompt first draws ``select`` candidates; they are scored in this step (the
  scorer is loaded beside the generator, whose memory plan leaves room for its weights), and
  a prompt with fewer than ``select`` candidates at or above ``min_score`` draws that many
  more, until enough pass or N are spent (its best is then kept, flagged ``below_gate`` by
  the keepers asset). Every round plans all prompts still short together, so retries fill
  the backend's batches too.
- A hosted backend's budget spans the rounds: a round draws only what the rest of the budget
  pays for, at the backend's price per image.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from imagegen_pipeline.backends.base import ImageBackend, RunSummary
from imagegen_pipeline.claims import partition_claim
from imagegen_pipeline.model_resolution import weights_present
from imagegen_pipeline.model_settings import ImageTarget
from imagegen_pipeline.project_config import ProjectConfig
from imagegen_pipeline.records import ImageRecord
from imagegen_pipeline.registry import SCORERS
from imagegen_pipeline.steps.candidate_scores import (
    ScoreBook,
    ScorerHandle,
    place_scorer,
    room_for_gate,
)
from imagegen_pipeline.steps.images import (
    ImagesKind,
    ImagesStepContext,
    PlannedImage,
    plan_images,
)
from imagegen_pipeline.steps.skeleton import StepOutcome, StepPlace, run_step

DEFAULT_SCORER = "clip"  # when hpsv2's weights are absent (see default_scorer_name)


def default_scorer_name(project: ProjectConfig) -> str:
    """``hpsv2`` when its real weights are on this machine (or a model is configured for it),
    else ``clip``: a random-weight HPS stand-in would rank by noise."""
    hpsv2 = SCORERS["hpsv2"]
    return "hpsv2" if project.model_for(hpsv2) != "auto" or weights_present(hpsv2) else "clip"


def scorers_needed(policies: Mapping[str, CandidatePolicy], gated_only: bool) -> set[str]:
    """The scorers ``policies`` rank by (of gated prompts only, for the images step)."""
    return {p.scorer for p in policies.values() if p.gated or not gated_only}


def scorers_to_place(policies: Mapping[str, CandidatePolicy]) -> set[str]:
    """The scorers of ungated prompts that choose among candidates: the images step runs
    them where they fit beside the generator. Not ``clip``: the quality step computes the CLIP
    score of every image anyway, with its own model."""
    return {
        p.scorer
        for p in policies.values()
        if not p.gated and p.candidates > p.select and p.scorer != DEFAULT_SCORER
    }


@dataclass(frozen=True)
class CandidatePolicy:
    """How one prompt's images are drawn and chosen."""

    candidates: int  # N: the most images drawn
    select: int  # keepers
    scorer: str  # a name of registry.SCORERS
    min_score: float | None  # the gate; None: no gate

    @property
    def gated(self) -> bool:
        """Whether candidates are scored while generating, to draw more below the gate."""
        return self.min_score is not None and self.candidates > self.select

    @property
    def first_round(self) -> int:
        """Candidates drawn before any score is known."""
        return self.select if self.gated else self.candidates


def _number(value: Any) -> float | None:
    """A cell as a number; None for an empty one (None, NaN, pandas' NA, "")."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return None
    return None if isinstance(value, str) and not value.strip() else float(value)


def candidate_policy(row: Mapping[str, Any], default_scorer: str) -> CandidatePolicy:
    """The policy of an enhanced-prompt row (tables written before best-of-N lack its columns:
    they keep the old behaviour)."""
    images = int(_number(row.get("num_images")) or 1)
    select = int(_number(row.get("select")) or images)
    candidates = int(_number(row.get("candidates")) or select)
    scorer = str(row.get("scorer") or "") or default_scorer
    return CandidatePolicy(max(candidates, select), select, scorer, _number(row.get("min_score")))


def policies_of(
    enhanced: pd.DataFrame, backend: str, default_scorer: str
) -> dict[str, CandidatePolicy]:
    """The policy of each prompt of ``enhanced`` that lists ``backend``."""
    return {
        row["prompt_id"]: candidate_policy(row, default_scorer)
        for row in enhanced.to_dict("records")
        if backend in list(row["backends"])
    }


def plan_candidates(
    enhanced: pd.DataFrame, target: ImageTarget, drawn: Mapping[str, int], since: Mapping[str, int]
) -> list[PlannedImage]:
    """The images of candidate indices ``since[p] <= i < drawn[p]`` of each prompt ``p``."""
    upto = enhanced.assign(num_images=[drawn.get(p, 0) for p in enhanced["prompt_id"]])
    return [
        item
        for item in plan_images(upto, target)
        if item.request.image_index >= since.get(item.request.prompt_id, 0)
    ]


@dataclass
class CandidatesOutcome:
    """What a best-of-N images step did: the images step's outcome over every round, and the
    rounds, retries and scoring it took."""

    outcome: StepOutcome[ImageRecord]
    policies: dict[str, CandidatePolicy]
    rounds: int = 0
    gate_retries: int = 0  # candidates drawn past each prompt's first round
    scored_in_step: int = 0
    scoring_seconds: float = 0.0  # scorer forward passes in this step (loads excluded)
    placements: dict[str, str] = field(default_factory=dict)  # ungated scorer: where, and why
    scorer_load_seconds: float = 0.0
    budget_stopped: list[str] = field(default_factory=list)  # prompts a budget left short
    summary: RunSummary = field(default_factory=RunSummary)  # the backend's, over every round


def run_candidates_step(
    target: ImageTarget,
    backend: Callable[[], ImageBackend],
    enhanced: pd.DataFrame,
    step: ImagesStepContext,
    scorers: Mapping[str, ScorerHandle],
    *,
    default_scorer: str = DEFAULT_SCORER,
    backend_settings: Any = None,
    extra: Sequence[PlannedImage] = (),
    log: Callable[[str], None] = print,
    kind: type[ImagesKind] | None = None,
) -> CandidatesOutcome:
    """Make every prompt's candidates (see the module docstring), holding the partition's
    claim over all rounds; ``scorers`` by name, each created only if a gate needs a score;
    ``extra``: images outside the CSV's candidates (replacements of rejected ones), made
    first."""
    name = target.settings.backend
    policies = policies_of(enhanced, name, default_scorer)
    prompt_column = "original_prompt" if "original_prompt" in enhanced else "enhanced_prompt"
    originals = dict(zip(enhanced["prompt_id"], enhanced[prompt_column], strict=True))
    drawn = {prompt: policy.first_round for prompt, policy in policies.items()}
    since: dict[str, int] = {}
    place = StepPlace(
        step.storage,
        step.prompt_set,
        name,
        step.run_id,
        writer_threads=step.writer_threads,
        verify=step.verify,
    )
    maker = (kind or ImagesKind)(target, backend, step, log)  # BatchImagesKind: Gemini batch
    book = ScoreBook.read(step.storage, step.prompt_set, name)
    result = CandidatesOutcome(StepOutcome([]), policies)
    records: dict[tuple[str, int], ImageRecord] = {}
    started = time.perf_counter()
    with partition_claim(step.storage, "images", step.prompt_set, name, log):
        # Replacements share their slot (prompt, index) with the image they replace: kept
        # apart from the candidates' bookkeeping, which is by slot.
        extra_records = []
        if extra:
            extra_outcome = run_step(maker, list(extra), place, log)
            _add(result, extra_outcome, maker)
            extra_records = extra_outcome.records
        planned = plan_candidates(enhanced, target, drawn, since)
        gated = sorted(scorers_needed(policies, True) & set(scorers))
        if planned and gated:  # the gate's scorer loads beside the generator: plan room for it
            backend().leave_room(room_for_gate([scorers[name] for name in gated]))
        while planned:
            result.rounds += 1
            outcome = run_step(maker, planned, place, log)
            _add(result, outcome, maker)
            records.update({(r.prompt_id, r.image_index): r for r in outcome.records})
            since = dict(drawn)
            open_gates = [
                prompt
                for prompt, policy in policies.items()
                if policy.gated and drawn[prompt] < policy.candidates
            ]
            # One batched scoring call per scorer per round, over every prompt at its gate.
            scores: dict[str, float | None] = {}
            for scorer in {policies[prompt].scorer for prompt in open_gates}:
                items = [
                    {**record.__dict__, "score_prompt": originals[owner]}
                    for (owner, _), record in records.items()
                    if owner in open_gates and policies[owner].scorer == scorer
                ]
                scores |= book.score(items, scorers[scorer], log)
            for prompt in open_gates:
                policy = policies[prompt]
                passing = sum(
                    1
                    for (owner, _), record in records.items()
                    if owner == prompt and _passes(scores.get(record.image_id), policy.min_score)
                )
                if passing < policy.select:
                    wanted = drawn[prompt] + policy.select - passing
                    drawn[prompt] = min(policy.candidates, wanted)
            _spend_within_budget(drawn, since, backend_settings, records, result)
            planned = plan_candidates(enhanced, target, drawn, since)
        for scorer in sorted(scorers_to_place(policies) & set(scorers)):
            here, why = place_scorer(backend(), scorers[scorer])
            result.placements[scorer] = f"{'images' if here else 'quality'} step: {why}"
            if here:
                items = [
                    {**record.__dict__, "score_prompt": originals[owner]}
                    for (owner, _), record in records.items()
                    if not policies[owner].gated and policies[owner].scorer == scorer
                ]
                book.score(items, scorers[scorer], log)
        book.save()
    order = {prompt: position for position, prompt in enumerate(policies)}
    ordered = sorted(records.values(), key=lambda r: (order.get(r.prompt_id, 0), r.image_index))
    ordered += extra_records
    result.outcome.records = ordered
    result.outcome.counts = dict(Counter(record.status for record in ordered))
    result.outcome.seconds = time.perf_counter() - started
    result.gate_retries = sum(drawn[prompt] - policies[prompt].first_round for prompt in policies)
    result.scored_in_step = book.computed
    result.scoring_seconds = book.seconds
    result.scorer_load_seconds = sum(handle.load_seconds for handle in scorers.values())
    return result


def _passes(score: float | None, gate: float | None) -> bool:
    return score is not None and gate is not None and score >= gate


def _add(result: CandidatesOutcome, outcome: StepOutcome[ImageRecord], maker: ImagesKind) -> None:
    """Add one round's totals to the step's (records and counts are set at the end)."""
    total = result.outcome
    total.generated += outcome.generated
    total.load_seconds += outcome.load_seconds
    total.damaged += outcome.damaged
    if outcome.generated:  # the backend ran: its loads and switches of this round count too
        result.summary = result.summary.followed_by(maker.run_summary())


def _spend_within_budget(
    drawn: dict[str, int],
    since: Mapping[str, int],
    settings: Any,
    records: Mapping[Any, ImageRecord],
    result: CandidatesOutcome,
) -> None:
    """Cut the next round to what the rest of a hosted backend's budget pays for: the
    budget is the run's, not one round's."""
    budget = getattr(settings, "budget_usd", None)
    # Gemini's expected price of an image in its mode (the price table's, half in batch mode).
    expected = getattr(settings, "expected_image_usd", None)
    price = expected() if callable(expected) else getattr(settings, "price_per_image_usd", None)
    if budget is None or not price:
        return
    spent = sum(record.cost_usd or 0.0 for record in records.values())
    room = max(0, int((budget - spent + 1e-12) // price))
    for prompt in drawn:
        extra = drawn[prompt] - since.get(prompt, 0)
        if extra > room:
            result.budget_stopped.append(prompt)
            drawn[prompt] = since.get(prompt, 0) + room
        room -= drawn[prompt] - since.get(prompt, 0)
