"""Which candidates are kept, Dagster-free: one pure function over scores and verdicts.

The ``keepers`` table has one row per candidate (every image row of the partition's quality
report, with its columns) and these:

| column | meaning |
| --- | --- |
| ``candidate_index`` | the image index; its seed comes from (the row's seed, this index) |
| ``scorer``, ``scorer_model_id``, ``scorer_revision`` | what ranked it |
| ``score`` | its score under that scorer (higher is preferred; None: not scored) |
| ``select``, ``min_score`` | the prompt's keepers wanted and gate |
| ``rank`` | 1 = best of the prompt's candidates that exist and are not blank |
| ``kept`` | chosen |
| ``below_gate`` | kept although under ``min_score``: no candidate passed, the best was kept |
| ``verdict`` | a reviewer's ``keep`` or ``reject`` that overrode the scorer, else "" |
| ``reason`` | why it was or was not kept, in words |
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from imagegen_pipeline.records import EXISTING_STATUSES
from imagegen_pipeline.steps.best_of_n import CandidatePolicy

KEEPER_COLUMNS = (
    "candidate_index",
    "scorer",
    "scorer_model_id",
    "scorer_revision",
    "score",
    "select",
    "min_score",
    "rank",
    "kept",
    "below_gate",
    "verdict",
    "reason",
)
VERDICTS = ("keep", "reject")


def candidate_table(quality: pd.DataFrame, policies: Mapping[str, CandidatePolicy]) -> pd.DataFrame:
    """The quality report's rows as candidates: each with its prompt's scorer, score (the
    report's ``score_<scorer>`` columns), ``select`` and ``min_score``. Rows of prompts no
    longer in the set are left out."""
    rows = []
    for row in quality.to_dict("records"):
        policy = policies.get(row["prompt_id"])
        if policy is None:
            continue
        column = f"score_{policy.scorer}"
        rows.append(
            {
                **row,
                "candidate_index": int(row["image_index"]),
                "scorer": policy.scorer,
                "scorer_model_id": row.get(f"{column}_model"),
                "scorer_revision": row.get(f"{column}_revision"),
                "score": row.get(column),
                "select": policy.select,
                "min_score": policy.min_score,
            }
        )
    columns = [*quality.columns, *KEEPER_COLUMNS[:7]]
    return pd.DataFrame(rows, columns=list(dict.fromkeys(columns)))


def _present(value: Any) -> bool:
    return value is not None and not (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def choose_keepers(candidates: pd.DataFrame, verdicts: pd.DataFrame | None = None) -> pd.DataFrame:
    """``candidates`` (see :func:`candidate_table`) with ``rank``, ``kept``, ``below_gate``,
    ``verdict`` and ``reason``: per prompt the ``select`` best by score, after a reviewer's
    verdicts (columns ``image_id``, ``verdict`` in keep/reject; the last verdict of an image
    counts): a kept image is kept whatever its score, a rejected one never is, and the scorer
    fills the remaining places. Blank images and images that do not exist are never kept."""
    said: dict[str, str] = {}
    if verdicts is not None and len(verdicts):
        unknown = sorted(set(verdicts["verdict"]) - set(VERDICTS))
        if unknown:
            raise ValueError(f"unknown verdict(s) {unknown}; use {', '.join(VERDICTS)}")
        said = dict(zip(verdicts["image_id"], verdicts["verdict"], strict=True))
    table = candidates.copy()
    for column, default in (("rank", None), ("kept", False), ("below_gate", False)):
        table[column] = default
    if table.empty:  # a set with no image (its CSV failed): the columns, no row
        return table.assign(verdict="", reason="", image_id=None, prompt_id=None)
    table["verdict"] = [said.get(image_id, "") for image_id in table["image_id"]]
    table["reason"] = ""
    for _, group in table.groupby("prompt_id", sort=False):
        _choose(table, group)
    table["rank"] = table["rank"].astype("Int64")
    return table


def _choose(table: pd.DataFrame, group: pd.DataFrame) -> None:
    """Rank, keep and explain the candidates of one prompt (rows of ``group``) in ``table``."""
    first = group.iloc[0]
    select, gate, scorer = int(first["select"]), first["min_score"], first["scorer"]
    gate = float(gate) if _present(gate) else None
    usable = group[group["status"].isin(EXISTING_STATUSES)]
    if "is_blank" in usable:
        usable = usable[~usable["is_blank"].eq(True)]
    scores = pd.to_numeric(usable["score"], errors="coerce")
    ordered = usable.assign(_score=scores).sort_values(
        ["_score", "candidate_index"], ascending=[False, True], na_position="last"
    )
    count = len(ordered)
    for rank, index in enumerate(ordered.index, start=1):
        table.at[index, "rank"] = rank
    forced = [i for i in ordered.index if table.at[i, "verdict"] == "keep"]
    open_places = max(select - len(forced), 0)
    by_score = [i for i in ordered.index if table.at[i, "verdict"] == ""][:open_places]
    kept = set(forced) | set(by_score)
    best_scores = [s for s in ordered["_score"] if pd.notna(s)]
    for index in group.index:
        row = table.loc[index]
        score = pd.to_numeric(row["score"], errors="coerce")
        if index not in ordered.index:
            blank = row["status"] in EXISTING_STATUSES
            table.at[index, "reason"] = "blank image" if blank else f"not made: {row['status']}"
            continue
        rank = int(table.at[index, "rank"])
        passes = gate is None or (pd.notna(score) and score >= gate)
        if row["verdict"] == "reject":
            table.at[index, "reason"] = "rejected by the reviewer"
        elif index in kept:
            table.at[index, "kept"] = True
            table.at[index, "below_gate"] = not passes
            if row["verdict"] == "keep":
                reason = "kept by the reviewer"
            elif pd.isna(score):
                reason = f"kept unscored (rank {rank} of {count}): no {scorer} score"
            else:
                runner_up = best_scores[len(kept)] if len(best_scores) > len(kept) else None
                reason = f"rank {rank} of {count} by {scorer} ({score:.4g}"
                reason += f"; next best {runner_up:.4g})" if runner_up is not None else ")"
            if not passes:
                reason += f"; under the gate {gate:.4g}: no candidate passed, the best is kept"
            table.at[index, "reason"] = reason
        else:
            table.at[index, "reason"] = (
                f"rank {rank} of {count} by {scorer}"
                + (f" ({score:.4g})" if pd.notna(score) else " (unscored)")
                + f": {select} keeper(s) wanted"
            )
