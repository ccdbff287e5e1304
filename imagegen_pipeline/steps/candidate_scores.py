"""Preference scores of a partition's images, computed once and kept: the score book.

Best-of-N scores candidates inside the images step (the gate needs them to decide on new
seeds), the quality step adds every scorer's column, and the keepers asset ranks by them. All
three read and extend one book per partition, ``<storage>/scores/<set>/<backend>.parquet``,
keyed by what a score depends on: the image file's sha256, the prompt and the scorer's model.
A re-run therefore never loads a scorer for images already scored, and a damaged image made
again (new bytes) is scored again. The book is a cache: a lost write only costs a re-score.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa
from PIL import Image

from imagegen_pipeline.image_files import DECODE_ERRORS
from imagegen_pipeline.memory_fit import fits_beside
from imagegen_pipeline.records import EXISTING_STATUSES, utc_now
from imagegen_pipeline.run_metadata import parquet_bytes
from imagegen_pipeline.scoring.preference import PreferenceScorer
from imagegen_pipeline.storage import Storage

BOOK_COLUMNS = ("sha256", "prompt", "scorer", "model_id", "revision", "score", "scored_at")
Key = tuple[str, str, str]  # (image sha256, prompt, scorer model id)


@dataclass
class ScorerHandle:
    """A scorer of a step by its row name: its label (known before loading, part of every
    score's key), its revision, and the model itself, created on first use."""

    name: str
    label: str
    revision: str
    model: Callable[[], PreferenceScorer]
    load_seconds: float = 0.0
    loads: int = 0


@dataclass
class ScoreBook:
    """The stored scores of one partition, and the ones added since it was read."""

    storage: Storage
    prompt_set: str
    backend: str
    rows: dict[Key, dict[str, Any]] = field(default_factory=dict)
    added: int = 0  # since the last save
    computed: int = 0  # scores computed in this step
    seconds: float = 0.0  # spent scoring in this step (loads excluded)

    @classmethod
    def read(cls, storage: Storage, prompt_set: str, backend: str) -> ScoreBook:
        """The partition's book (empty when none was written yet)."""
        book = cls(storage, prompt_set, backend)
        try:
            table = pd.read_parquet(io.BytesIO(storage.read_bytes(book.path)))
        except FileNotFoundError:
            return book
        for row in table.to_dict("records"):
            book.rows[(row["sha256"], row["prompt"], row["model_id"])] = row
        return book

    @property
    def path(self) -> Any:
        """Where the book is stored."""
        return self.storage.path("scores", self.prompt_set, f"{self.backend}.parquet")

    def get(self, sha256: str | None, prompt: str, scorer: ScorerHandle) -> float | None:
        """The stored score of an image file against ``prompt`` under ``scorer``, if any."""
        row = self.rows.get((sha256 or "", prompt, scorer.label))
        return None if row is None else float(row["score"])

    def save(self) -> None:
        """Write the book atomically, when something was added."""
        if not self.added:
            return
        frame = pd.DataFrame(list(self.rows.values()), columns=list(BOOK_COLUMNS))
        table = pa.Table.from_pandas(frame, preserve_index=False)
        self.storage.write_bytes(self.path, parquet_bytes(table))
        self.added = 0

    def score(
        self,
        items: Sequence[Mapping[str, Any]],
        scorer: ScorerHandle,
        log: Callable[[str], None] = print,
    ) -> dict[str, float | None]:
        """The score of each item (an image row: image_id, sha256, path, status, and
        ``score_prompt``), by image id: from the book, else computed now in batches (the model
        loads only then). Items without a readable file score None."""
        scores: dict[str, float | None] = {}
        todo: list[tuple[Mapping[str, Any], Image.Image]] = []
        for item in items:
            if item.get("status") not in EXISTING_STATUSES or not item.get("path"):
                scores[item["image_id"]] = None
                continue
            known = self.get(item.get("sha256"), item["score_prompt"], scorer)
            if known is not None:
                scores[item["image_id"]] = known
                continue
            try:
                with Image.open(self.storage.open_binary(item["path"])) as image:
                    todo.append((item, image.convert("RGB")))
            except DECODE_ERRORS as error:
                log(f"{item['image_id'][:16]}: cannot be scored: {type(error).__name__}: {error}")
                scores[item["image_id"]] = None
        if not todo:
            return scores
        model = scorer.model()
        loaded = model.load()
        if loaded:
            scorer.load_seconds += loaded
            scorer.loads += 1
        started = time.perf_counter()
        values = model.score([image for _, image in todo], [i["score_prompt"] for i, _ in todo])
        self.seconds += time.perf_counter() - started
        now = utc_now()
        for (item, _), value in zip(todo, values, strict=True):
            scores[item["image_id"]] = float(value)
            key = (item.get("sha256") or "", item["score_prompt"], scorer.label)
            self.rows[key] = dict(
                zip(
                    BOOK_COLUMNS,
                    [*key[:2], scorer.name, scorer.label, scorer.revision, float(value), now],
                    strict=True,
                )
            )
            self.added += 1
            self.computed += 1
        return scores


def room_for_gate(scorers: Sequence[ScorerHandle]) -> int:
    """Device bytes a gate's scorers will take when they load beside the generator: none for
    one loaded already (the free memory the generator plans with shows it), and none for one
    that cannot be sized before loading."""
    room = 0
    for handle in scorers:
        model = handle.model()
        if getattr(model, "model", None) is None:
            room += model.planned_weight_bytes() or 0
    return room


def place_scorer(generator: Any, scorer: ScorerHandle) -> tuple[bool, str]:
    """Whether ``scorer`` runs in the images step, beside ``generator`` on its device (True),
    or is left to the quality step, and why: the generator's memory plan decides."""
    plan = getattr(generator, "memory_plan", None)
    if plan is None:
        return False, "no memory plan of the generator (a hosted API, unloaded, or set by hand)"
    planned = scorer.model().planned_weight_bytes()
    if planned is None:
        return False, f"{scorer.name}'s weights cannot be sized before loading"
    fits, why = fits_beside(plan, planned)
    return fits, f"{scorer.name} {why}"


def add_scorer_columns(
    table: pd.DataFrame,
    scorers: Mapping[str, ScorerHandle],
    book: ScoreBook,
    original_prompts: Mapping[str, str],
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """``table`` (a quality report) with, per scorer, ``score_<name>`` (each image against
    its original prompt), ``score_<name>_model`` and ``score_<name>_revision``. The ``clip``
    scorer's score is the report's own ``clip_score``; the others come from ``book`` or are
    computed now."""
    table = table.copy()
    items = [
        {**row, "score_prompt": original_prompts.get(row["prompt_id"], row.get("prompt") or "")}
        for row in table.to_dict("records")
    ]
    for name, handle in sorted(scorers.items()):
        column = f"score_{name}"
        if name == "clip":
            table[column] = table.get("clip_score")
        else:
            scores = book.score(items, handle, log)
            table[column] = [scores.get(item["image_id"]) for item in items]
        table[f"{column}_model"] = handle.label
        table[f"{column}_revision"] = handle.revision
    book.save()
    return table
