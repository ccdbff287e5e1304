"""One quality step, Dagster-free: score every image of a partition, and every video clip.

Files are read, decoded, measured (``perceptual``) and preprocessed by a few threads ahead of
the model, so the accelerator is not left waiting on PNG or MP4 decoding; a bounded window of
prefetched items keeps memory flat however many a partition has. Scores of files whose bytes
and prompts did not change are reused from the last report, and the model is loaded only when
something is left to score.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import pandas as pd
from PIL import Image

from imagegen_pipeline.image_files import DECODE_ERRORS
from imagegen_pipeline.progress import Progress
from imagegen_pipeline.records import EXISTING_STATUSES
from imagegen_pipeline.scoring.perceptual import (
    DEFAULT_BLANK_THRESHOLDS,
    METRICS_VERSION,
    BlankThresholds,
    perceptual_metrics,
)
from imagegen_pipeline.storage import Storage
from imagegen_pipeline.video.video_files import read_mp4_frames

if TYPE_CHECKING:
    import torch

    from imagegen_pipeline.scoring.clip_model import ClipModel

T = TypeVar("T")
R = TypeVar("R")
_END: Any = object()


def prefetched(fn: Callable[[T], R], items: Iterable[T], workers: int, window: int) -> Iterator[R]:
    """``map(fn, items)`` in order, on ``workers`` threads, at most ``window`` results ahead."""
    if workers <= 0:
        yield from map(fn, items)
        return
    iterator = iter(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque[Future[R]] = deque()
        for item in iterator:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                break
        while pending:
            result = pending.popleft().result()
            next_item = next(iterator, _END)
            if next_item is not _END:
                pending.append(pool.submit(fn, next_item))
            yield result


# Columns of a report that describe how an image was made, not how it scored.
_NOT_SCORES = frozenset(
    {
        "original_prompt",
        "score_key",
        "scorer_model",
        "newly_scored",
        "generation_seconds",
        "generation_cost_usd",
        "generated_at",
    }
)


def score_key(row: Mapping[str, Any], scorer_label: str, thresholds: BlankThresholds) -> str:
    """What an item's scores depend on: its bytes, both prompts, the scorer, the thresholds
    and the definition of the pixel statistics."""
    parts = [row.get("sha256"), row.get("original_prompt"), row.get("prompt"), scorer_label]
    return hashlib.sha256(
        json.dumps([*parts, repr(thresholds), METRICS_VERSION]).encode()
    ).hexdigest()


def reusable_scores(previous: pd.DataFrame | None, table: pd.DataFrame) -> dict[str, dict]:
    """Score columns of an earlier report's scored rows, by score key."""
    if previous is None or previous.empty or "score_key" not in previous:
        return {}
    columns = [c for c in previous.columns if c not in table.columns and c not in _NOT_SCORES]
    scored = previous[previous["scored"].eq(True)]
    return {
        key: dict(zip(columns, values, strict=True))
        for key, values in zip(
            scored["score_key"], scored[columns].itertuples(index=False), strict=True
        )
    }


@dataclass(frozen=True)
class Scorer:
    """The CLIP model of a scoring step: its label (recorded with every score, part of each
    score's reuse key) and the model itself, created on first use, so a step whose scores
    all exist never creates it (nor imports torch)."""

    label: str
    model: Callable[[], ClipModel]

    @classmethod
    def of(cls, model: ClipModel) -> Scorer:
        """A scorer for a model that already exists."""
        return cls(model.model_label, lambda: model)


def scored_table(rows: list[dict[str, Any]], scorer: Scorer) -> pd.DataFrame:
    """The report of ``rows``, each marked with the scorer's label."""
    table = pd.DataFrame(rows)
    table["scorer_model"] = scorer.label
    return table


def rows_to_score(
    table: pd.DataFrame,
    previous: pd.DataFrame | None,
    scorer_label: str,
    thresholds: BlankThresholds,
) -> tuple[list[dict[str, Any]], list[int]]:
    """The rows of ``table`` with their score keys, earlier scores reused where still valid,
    and the indices of the rows that exist and still need scoring."""
    reusable = reusable_scores(previous, table)
    rows = [dict(row) for row in table.to_dict("records")]
    todo = []
    for index, row in enumerate(rows):
        row["scored"] = row["newly_scored"] = False
        row["score_error"] = None
        row["score_key"] = score_key(row, scorer_label, thresholds)
        if row.get("status") not in EXISTING_STATUSES or not row.get("path"):
            continue
        if row["score_key"] in reusable:
            row.update(reusable[row["score_key"]])
        else:
            todo.append(index)
    return rows, todo


def score_image_table(
    scorer: Scorer,
    images: pd.DataFrame,
    original_prompts: Mapping[str, str],
    *,
    storage: Storage,
    thresholds: BlankThresholds = DEFAULT_BLANK_THRESHOLDS,
    workers: int = 4,
    previous: pd.DataFrame | None = None,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """The ``images`` table with every score added; rows without an image keep empty scores.

    ``original_prompts`` maps prompt ids to the user's prompt; the table's ``prompt`` column is
    the enhanced prompt the backend was given. Scores of ``previous`` (the last report) are
    reused where nothing they depend on changed; the model loads only if something is left.
    """
    originals = [
        original_prompts.get(row["prompt_id"], row.get("prompt"))
        for row in images.to_dict("records")
    ]
    rows, todo = rows_to_score(
        images.assign(original_prompt=originals), previous, scorer.label, thresholds
    )
    if not todo:
        return scored_table(rows, scorer)
    model = scorer.model()
    model.load()
    progress = Progress("images scored", len(todo), log)
    import torch  # only now: a re-run with nothing to score never pays for importing it

    def prepare(index: int) -> tuple[int, torch.Tensor | None, dict[str, Any]]:
        try:
            with Image.open(storage.open_binary(rows[index]["path"])) as image:
                image = image.convert("RGB")
            return index, model.preprocess(image), perceptual_metrics(image, thresholds)
        except DECODE_ERRORS as error:  # a missing or corrupt file fails alone
            return index, None, {"score_error": f"{type(error).__name__}: {error}"}

    batch: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        indices = [index for index, _ in batch]
        scores = model.score_pixels(
            torch.stack([pixels for _, pixels in batch]),
            [rows[i]["original_prompt"] for i in indices],
            [rows[i].get("prompt") for i in indices],
        )
        for index, score in zip(indices, scores, strict=True):
            rows[index].update(score, scored=True, newly_scored=True)
        progress.advance(len(batch))
        batch.clear()

    size = model.config.batch_size
    for index, pixels, measured in prefetched(prepare, todo, workers, window=2 * size):
        rows[index].update(measured)
        if pixels is not None:
            batch.append((index, pixels))
        else:
            progress.advance()
        if len(batch) == size:
            flush()
    if batch:
        flush()
    progress.finish()
    return scored_table(rows, scorer)


def with_generation_facts(table: pd.DataFrame, image_runs: pd.DataFrame) -> pd.DataFrame:
    """``table`` plus how each image was made, from the run that made it.

    A re-run reports existing images as ``skipped_existing`` with no time or cost; the run
    metadata still holds the row of the run that generated each one.
    """
    if table.empty:
        return table
    made = image_runs[
        (image_runs["status"] == "ok") & image_runs["image_id"].isin(table["image_id"])
    ]
    made = made.sort_values("finished_at").drop_duplicates("image_id", keep="last")
    facts = made[["image_id", "seconds", "cost_usd", "finished_at"]].rename(
        columns={
            "seconds": "generation_seconds",
            "cost_usd": "generation_cost_usd",
            "finished_at": "generated_at",
        }
    )
    return table.merge(facts, on="image_id", how="left")


def score_video_clip_table(
    scorer: Scorer,
    clips: pd.DataFrame,
    *,
    storage: Storage,
    workers: int = 2,
    previous: pd.DataFrame | None = None,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """The ``clips`` table with each existing clip's source similarity and temporal consistency.

    Scores of ``previous`` are reused for clips whose bytes and scorer are unchanged.
    """
    rows, todo = rows_to_score(clips, previous, scorer.label, DEFAULT_BLANK_THRESHOLDS)
    if not todo:
        return scored_table(rows, scorer)
    model = scorer.model()
    model.load()
    progress = Progress("video clips scored", len(todo), log)

    def decode(index: int) -> tuple[int, Any]:
        row = rows[index]
        try:
            frames = read_mp4_frames(storage.read_bytes(row["path"]))
            source = Image.open(io.BytesIO(storage.read_bytes(row["source_path"]))).convert("RGB")
            return index, (source, frames)
        except DECODE_ERRORS as error:
            return index, error

    for index, decoded in prefetched(decode, todo, workers, window=2 * max(workers, 1)):
        row = rows[index]
        row["newly_scored"] = True
        if isinstance(decoded, Exception):
            row["score_error"] = f"{type(decoded).__name__}: {decoded}"
        else:
            try:
                row.update(model.score_video_clip(*decoded), scored=True)
            except ValueError as error:
                row["score_error"] = f"{type(error).__name__}: {error}"
        progress.advance()
    progress.finish()
    return scored_table(rows, scorer)
