"""Hybrid overflow: rows whose ``backends`` cell is ``any`` go to a local backend while its
queue is short, and overflow to Gemini (online or batch) within Gemini's budget.

A set's rows are routed once, in row order, and the decision is kept in
``<storage>/routing/<set>.json``: both partitions of the set (the local one and Gemini's), in
whichever run and order they go, plan from the same decision, and a re-run never moves a row
(its images' content addresses name the backend: moving it would make them twice). Rows added
to the CSV later are routed when a step first sees them, after the rows already routed.

The estimate: the local backend's queue is the set's images planned for it (rows naming it, and
``any`` rows routed to it so far) times its seconds per image, measured as the median over its
last step rows (``steps`` run metadata: seconds / images made), or
``overflow_seconds_per_image`` before it ever ran. A row goes local while the queue with it
stays within ``overflow_queue_limit_seconds``; else to Gemini while Gemini's expected cost of
the overflow (``expected_image_usd``: half price in batch mode) stays within ``budget_usd``;
else local anyway (never dropped). Settings are the ``gemini`` resource's, with the set's
sidecar ``[gemini]`` table over them.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from imagegen_pipeline.claims import partition_claim
from imagegen_pipeline.records import utc_now
from imagegen_pipeline.registry import ANY_BACKEND
from imagegen_pipeline.run_metadata import load_run_metadata
from imagegen_pipeline.storage import Storage

MEASURED_STEPS = 20  # the last step rows whose rate is the local backend's measured speed


@dataclass
class Routing:
    """Where each ``any`` row of a set goes, and the figures that decided it."""

    local_backend: str
    overflow_backend: str
    rows: dict[str, str] = field(default_factory=dict)  # prompt id -> backend
    seconds_per_image: float = 0.0
    queue_seconds: float = 0.0  # the local queue's estimate once every row was routed
    overflow_usd: float = 0.0  # the expected cost of the overflow images

    def images(self, enhanced: pd.DataFrame, backend: str) -> int:
        """How many images of the ``any`` rows went to ``backend``."""
        if not len(enhanced):
            return 0
        routed = enhanced[[self.rows.get(pid) == backend for pid in enhanced["prompt_id"]]]
        return int(routed["num_images"].sum())


def has_any_rows(enhanced: pd.DataFrame) -> bool:
    """Whether some row of the set leaves the backend to the pipeline."""
    return bool(len(enhanced)) and any(ANY_BACKEND in list(b) for b in enhanced["backends"])


def measured_seconds_per_image(storage: Storage, backend: str) -> float | None:
    """The local backend's seconds per image over its last step rows that made images."""
    # Every set's rows of that backend: the folders are per set, so read the table's columns.
    columns = ["asset", "backend", "generated", "seconds", "recorded_at"]
    steps = load_run_metadata(storage, "steps", columns=columns)
    if not len(steps):
        return None
    made = steps[
        (steps["asset"] == "images") & (steps["backend"] == backend) & (steps["generated"] > 0)
    ]
    made = made.sort_values("recorded_at").tail(MEASURED_STEPS)
    rates = [row.seconds / row.generated for row in made.itertuples() if row.seconds > 0]
    return statistics.median(rates) if rates else None


def route_rows(
    enhanced: pd.DataFrame,
    previous: Routing,
    *,
    seconds_per_image: float,
    limit_seconds: float,
    image_usd: float,
    budget_usd: float | None,
) -> Routing:
    """Route the ``any`` rows ``previous`` has not routed (see the module docstring)."""
    routing = Routing(previous.local_backend, previous.overflow_backend, dict(previous.rows))
    local, overflow = routing.local_backend, routing.overflow_backend
    queued = 0
    overflow_images = 0
    for row in enhanced.to_dict("records"):
        named = list(row["backends"])
        count = int(row["num_images"])
        if local in named or routing.rows.get(row["prompt_id"]) == local:
            queued += count
        elif routing.rows.get(row["prompt_id"]) == overflow:
            overflow_images += count
    for row in enhanced.to_dict("records"):
        if ANY_BACKEND not in list(row["backends"]) or row["prompt_id"] in routing.rows:
            continue
        count = int(row["num_images"])
        fits_locally = (queued + count) * seconds_per_image <= limit_seconds
        affordable = budget_usd is None or (overflow_images + count) * image_usd <= budget_usd
        if fits_locally or not affordable:
            routing.rows[row["prompt_id"]] = local
            queued += count
        else:
            routing.rows[row["prompt_id"]] = overflow
            overflow_images += count
    routing.seconds_per_image = seconds_per_image
    routing.queue_seconds = queued * seconds_per_image
    routing.overflow_usd = overflow_images * image_usd
    return routing


def routing_path(storage: Storage, prompt_set: str) -> Any:
    return storage.path("routing", f"{prompt_set}.json")


def routed_prompts(
    storage: Storage,
    prompt_set: str,
    enhanced: pd.DataFrame,
    *,
    local_backend: str,
    overflow_backend: str,
    settings: Any,
    log: Callable[[str], None],
) -> tuple[pd.DataFrame, Routing | None]:
    """``enhanced`` with each ``any`` row's backends replaced by the one it is routed to (the
    decision read from, or added to, the set's routing file), and the routing; unchanged and
    None for a set without such rows."""
    if not has_any_rows(enhanced):
        return enhanced, None
    path = routing_path(storage, prompt_set)
    with partition_claim(storage, "routing", prompt_set, ANY_BACKEND, log):
        previous = Routing(local_backend, overflow_backend)
        saved: dict[str, Any] = {}
        if storage.exists(path):
            saved = json.loads(storage.read_bytes(path))
            previous = Routing(
                saved["local_backend"], saved["overflow_backend"], dict(saved["rows"])
            )
        pending = [
            pid
            for pid, backends in zip(enhanced["prompt_id"], enhanced["backends"], strict=True)
            if ANY_BACKEND in list(backends) and pid not in previous.rows
        ]
        # Measured only when something is to be decided: it reads the steps table.
        measured = measured_seconds_per_image(storage, previous.local_backend) if pending else None
        rate = measured or saved.get("seconds_per_image") or settings.overflow_seconds_per_image
        routing = route_rows(
            enhanced,
            previous,
            seconds_per_image=rate,
            limit_seconds=settings.overflow_queue_limit_seconds,
            image_usd=settings.expected_image_usd(),
            budget_usd=settings.budget_usd,
        )
        if pending:
            body = {
                "local_backend": routing.local_backend,
                "overflow_backend": routing.overflow_backend,
                "rows": routing.rows,
                "seconds_per_image": routing.seconds_per_image,
                "measured": measured is not None,
                "queue_seconds": routing.queue_seconds,
                "limit_seconds": settings.overflow_queue_limit_seconds,
                "overflow_usd": routing.overflow_usd,
                "decided_at": utc_now().isoformat(),
            }
            storage.write_bytes(path, json.dumps(body, indent=1, sort_keys=True).encode())
            overflowed = sum(1 for pid in pending if routing.rows[pid] == overflow_backend)
            log(
                f"{prompt_set}: routed {len(pending)} 'any' row(s): {overflowed} to "
                f"{overflow_backend}, the rest to {routing.local_backend} (queue "
                f"{routing.queue_seconds:.0f} s at {routing.seconds_per_image:.2f} s/image, "
                f"limit {settings.overflow_queue_limit_seconds:.0f} s)."
            )
    routed = enhanced.copy()
    routed["backends"] = [
        [routing.rows[pid]] if ANY_BACKEND in list(backends) else list(backends)
        for pid, backends in zip(routed["prompt_id"], routed["backends"], strict=True)
    ]
    return routed, routing


def first_local_backend(local_backends: Sequence[str], wanted: str | None) -> str:
    """The local backend ``any`` rows go to first: the one named, else the first registered."""
    if wanted:
        if wanted not in local_backends:
            raise ValueError(
                f"overflow_local_backend {wanted!r} is not a local backend; use "
                f"{', '.join(local_backends)}"
            )
        return wanted
    return local_backends[0]


HYBRID_COLUMNS = ("any_rows_images", "any_rows_cost_usd")


def load_routing(storage: Storage, prompt_set: str) -> dict[str, str]:
    """The set's routed ``any`` rows (prompt id -> backend); empty for a set without any."""
    path = routing_path(storage, prompt_set)
    if not storage.exists(path):
        return {}
    return dict(json.loads(storage.read_bytes(path))["rows"])


def with_hybrid_split(
    summary: pd.DataFrame, reports: dict[str, pd.DataFrame], routed: dict[str, str]
) -> pd.DataFrame:
    """The comparison's rows with, per backend, the images of ``any`` rows it made and their
    cost (a set without such rows is returned as it is)."""
    if not routed or not len(summary):
        return summary
    images, costs = [], []
    for backend in summary["backend"]:
        table = reports.get(backend, pd.DataFrame())
        mine = [pid for pid, where in routed.items() if where == backend]
        rows = table[table["prompt_id"].isin(mine)] if "prompt_id" in table else table.head(0)
        made = rows[rows["status"].isin(("ok", "skipped_existing"))] if len(rows) else rows
        images.append(len(made))
        cost = pd.to_numeric(made.get("generation_cost_usd", pd.Series(dtype=float)))
        costs.append(float(cost.fillna(0.0).sum()))
    return summary.assign(any_rows_images=images, any_rows_cost_usd=costs)
