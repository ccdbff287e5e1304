"""What every model step records about itself (one row in the ``steps`` run-metadata table),
and the loop over a run's partitions that every model asset shares."""

import os
import socket
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pandas as pd

from imagegen_pipeline.defs.partitions import keys_by_backend
from imagegen_pipeline.records import StepRecord, utc_now
from imagegen_pipeline.run_metadata import write_records
from imagegen_pipeline.steps.skeleton import StepOutcome
from imagegen_pipeline.storage import Storage


def worker_name() -> str:
    """The process running this step: the celery worker's node name inside a celery task,
    else host:pid."""
    try:
        from celery import current_task

        if current_task and current_task.request.hostname:
            return str(current_task.request.hostname)
    except ImportError:  # celery is only installed for the distributed executors
        pass
    return f"{socket.gethostname()}:{os.getpid()}"


def model_use(outcome: StepOutcome[Any], is_local: bool) -> dict[str, Any]:
    """Loads and warm-cache hits of one step: a load when it loaded the model, a hit when it
    had work and found the model already loaded (by an earlier step, run or partition)."""
    loaded = outcome.load_seconds > 0
    return {
        "model_loads": int(loaded),
        "model_cache_hits": int(is_local and outcome.generated > 0 and not loaded),
        "model_load_seconds": outcome.load_seconds,
    }


def step_totals(what: str, prompt_sets: int, counts: dict[str, int]) -> str:
    """One log line for a step over many prompt sets: items by status, e.g.
    "images flux_schnell, 48 prompt set(s): 96 skipped_existing, 2 ok"."""
    by_status = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
    return f"{what}, {prompt_sets} prompt set(s): {by_status or 'nothing planned'}."


def generation_step_record(
    context: Any,
    asset: str,
    prompt_set: str,
    backend: str,
    settings: Any,
    device: str | None,
    outcome: StepOutcome[Any],
    *,
    is_local: bool,
    started_at: datetime | None = None,
    **extra: Any,
) -> StepRecord:
    """The step row of one partition of a generating step (images, clips) from its outcome:
    counts by status, time, the model it used (``settings``' model_id and revision; the
    ``device`` it ran on, None when nothing was made), loads and warm-cache hits."""
    counts = outcome.counts
    return StepRecord(
        run_id=context.run.run_id,
        asset=asset,
        prompt_set=prompt_set,
        backend=backend,
        model_id=settings.model_id,
        revision=settings.revision,
        device=device,
        worker=worker_name(),
        requested=len(outcome.records),
        generated=counts.get("ok", 0),
        skipped_existing=counts.get("skipped_existing", 0),
        failed=counts.get("failed", 0),
        blocked=counts.get("blocked", 0),
        skipped_budget=counts.get("skipped_budget", 0),
        seconds=outcome.seconds,
        started_at=started_at,
        **model_use(outcome, is_local),
        **extra,
    )


def scoring_step_record(
    context: Any,
    asset: str,
    prompt_set: str,
    backend: str,
    table: pd.DataFrame,
    *,
    model_id: str,
    device: str | None,
    seconds: float,
    load_seconds: float,
) -> StepRecord:
    """The step row of one partition of a scoring step (quality, video_quality) from its
    table: rows newly scored, reused and failed; a load when ``load_seconds``, a warm-cache
    hit when it scored something without loading."""
    newly = int(table["newly_scored"].sum()) if len(table) else 0
    scored = int(table["scored"].astype(bool).sum()) if len(table) else 0
    return StepRecord(
        run_id=context.run.run_id,
        asset=asset,
        prompt_set=prompt_set,
        backend=backend,
        model_id=model_id,
        revision=None,
        device=device,
        worker=worker_name(),
        requested=len(table),
        generated=newly,
        skipped_existing=scored - newly,
        failed=int(table["score_error"].notna().sum()) if len(table) else 0,
        seconds=seconds,
        items_per_second=newly / max(seconds - load_seconds, 1e-9) if newly else None,
        model_loads=int(load_seconds > 0),
        model_cache_hits=int(newly > 0 and not load_seconds > 0),
        model_load_seconds=load_seconds,
    )


def write_step_record(storage: Storage, record: StepRecord) -> str | None:
    """Add one step row to the ``steps`` table; returns the file it went to."""
    record.finished_at = record.finished_at or utc_now()
    return write_records(
        storage,
        "steps",
        [record],
        run_id=record.run_id,
        prompt_set=record.prompt_set,
        backend=record.backend,
    )


@dataclass
class PartitionStep:
    """What one partition's step hands back: its table, its step row, the counts its totals
    line adds up, and its materialization metadata."""

    table: pd.DataFrame
    record: StepRecord
    counts: Mapping[str, int]
    metadata: dict[str, Any] = field(default_factory=dict)


def each_partition(
    context: Any,
    what: str,
    step: Callable[[Any, str, str, str], PartitionStep],
    model: Callable[[str], AbstractContextManager[Any]],
    backends: Collection[str] | None = None,
) -> dict[str, PartitionStep]:
    """Run ``step(model, key, prompt_set, backend)`` on each partition of the run, backend by
    backend inside ``model(backend)`` (so a model loads once per backend, or once for all when
    it is the same context), keeping only ``backends`` if given. Each partition's step row is
    written as if it had run alone; one totals line per backend is logged."""
    storage = context.resources.storage.storage()
    results: dict[str, PartitionStep] = {}
    for backend, entries in keys_by_backend(context.partition_keys).items():
        if backends is not None and backend not in backends:
            continue
        totals: Counter[str] = Counter()
        with model(backend) as warm:
            for key, prompt_set in entries:
                started_at = utc_now()
                result = step(warm, key, prompt_set, backend)
                result.record.started_at = result.record.started_at or started_at
                write_step_record(storage, result.record)
                totals.update(result.counts)
                results[key] = result
        context.log.info(step_totals(f"{what} {backend}", len(entries), totals))
    return results
