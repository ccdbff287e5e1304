"""Reviewers' verdicts as data: append-only Parquet under ``reviews/<set>/<backend>/``.

Every verdict (or batch of verdicts) is one new Parquet part, written atomically under a name
that starts with its UTC time and ends with random hex: two reviewers writing at the same moment
make two files, so neither loses a verdict, and no file is ever rewritten. Readers take the
latest verdict per image (a reviewer may change their mind). The files read with pandas, DuckDB
and Polars like the run metadata::

    select * from read_parquet('storage/reviews/*/*/*.parquet')

``read_verdicts`` is the seam the keepers computation calls; it imports no Dagster.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Literal, get_args

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from imagegen_pipeline.records import arrow_schema, utc_now
from imagegen_pipeline.storage import Storage

Verdict = Literal["keep", "reject"]
VERDICTS: tuple[str, ...] = get_args(Verdict)
VERDICT_COLUMNS = ["image_id", "verdict", "note", "reviewer", "time"]
MAX_NOTE_CHARS = 2000


@dataclass
class VerdictRecord:
    """One reviewer's verdict on one image."""

    prompt_set: str
    backend: str
    image_id: str
    verdict: str  # Verdict
    note: str
    reviewer: str
    time: datetime


VERDICT_SCHEMA = arrow_schema(VerdictRecord)


def reviews_folder(
    storage: Storage, prompt_set: str | None = None, backend: str | None = None
) -> UPath:
    """``reviews/`` or one prompt set's (and backend's) folder of verdict parts."""
    parts = [p for p in (prompt_set, backend) if p]
    return storage.path("reviews", *parts)


PART_TIME_FORMAT = "%Y%m%dT%H%M%S%f"


def part_name(when: datetime) -> str:
    """A new part's file name: sortable by time, unique by its random tail."""
    return f"{when.strftime(PART_TIME_FORMAT)}_{secrets.token_hex(4)}.parquet"


def part_time(name: str) -> datetime:
    """The UTC time a part's name starts with (its newest verdict's)."""
    stamp = PurePosixPath(name).name.split("_", 1)[0]
    return datetime.strptime(stamp, PART_TIME_FORMAT).replace(tzinfo=UTC)


def write_verdicts(storage: Storage, verdicts: Iterable[VerdictRecord]) -> list[str]:
    """Append ``verdicts`` (one part per prompt set x backend); returns the parts written,
    relative to the storage base. Raises ValueError on a verdict other than keep / reject."""
    by_partition: dict[tuple[str, str], list[VerdictRecord]] = {}
    for record in verdicts:
        if record.verdict not in VERDICTS:
            raise ValueError(f"verdict {record.verdict!r}: expected one of {', '.join(VERDICTS)}")
        record.note = (record.note or "")[:MAX_NOTE_CHARS]
        by_partition.setdefault((record.prompt_set, record.backend), []).append(record)
    written = []
    for (prompt_set, backend), records in by_partition.items():
        table = pa.Table.from_pylist([asdict(r) for r in records], schema=VERDICT_SCHEMA)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        name = part_name(max(r.time for r in records))
        storage.write_bytes(reviews_folder(storage, prompt_set, backend) / name, buffer.getvalue())
        written.append(f"reviews/{prompt_set}/{backend}/{name}")
    return written


def record_verdict(
    storage: Storage,
    prompt_set: str,
    backend: str,
    image_id: str,
    verdict: str,
    *,
    note: str = "",
    reviewer: str = "",
) -> str:
    """Append one verdict now; returns its part."""
    record = VerdictRecord(prompt_set, backend, image_id, verdict, note, reviewer, utc_now())
    return write_verdicts(storage, [record])[0]


def _read_parts(storage: Storage, folder: UPath, names: Iterable[str]) -> pd.DataFrame:
    tables = [
        pq.read_table(io.BytesIO(storage.read_bytes(folder / name)), schema=VERDICT_SCHEMA)
        for name in names
    ]
    if not tables:
        return VERDICT_SCHEMA.empty_table().to_pandas()
    return pa.concat_tables(tables).to_pandas()


def read_verdict_parts(storage: Storage, names: Iterable[str]) -> pd.DataFrame:
    """The verdicts of some parts, named relative to ``reviews/`` (a sensor's new parts)."""
    return _read_parts(storage, reviews_folder(storage), names)


def latest_per_image(history: pd.DataFrame) -> pd.DataFrame:
    """The last verdict of each image (ties: the part written last)."""
    if history.empty:
        return history
    ordered = history.sort_values("time", kind="stable")
    return ordered.drop_duplicates(["prompt_set", "backend", "image_id"], keep="last")


def verdict_history(
    storage: Storage, prompt_set: str | None = None, backend: str | None = None
) -> pd.DataFrame:
    """Every verdict ever written (of one prompt set, or one partition), oldest first."""
    folder = reviews_folder(storage, prompt_set, backend)
    names = sorted(
        storage.list_files(folder), key=lambda name: PurePosixPath(name).name
    )  # by time, across partitions
    history = _read_parts(storage, folder, names)
    return history.sort_values("time", kind="stable").reset_index(drop=True)


def read_verdicts(storage: Storage, prompt_set: str, backend: str) -> pd.DataFrame:
    """The latest verdict per image of one prompt set x backend: image_id, verdict (keep |
    reject), note, reviewer, time. Images nobody reviewed have no row."""
    latest = latest_per_image(verdict_history(storage, prompt_set, backend))
    return latest[VERDICT_COLUMNS].reset_index(drop=True)


class VerdictCache:
    """The verdicts of a store, re-reading only parts written since the last call (the app asks
    on every page view; parts are never rewritten, so a part read once is read for good)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._parts: dict[str, pd.DataFrame] = {}

    def latest(self, prompt_set: str) -> pd.DataFrame:
        """The latest verdict per image of a prompt set (every backend)."""
        folder = reviews_folder(self.storage, prompt_set)
        listed = self.storage.list_files(folder)
        for name in listed:
            key = f"{prompt_set}/{name}"
            if key not in self._parts:
                self._parts[key] = _read_parts(self.storage, folder, [name])
        frames = [self._parts[f"{prompt_set}/{name}"] for name in listed]
        if not frames:
            return _read_parts(self.storage, folder, [])
        return latest_per_image(pd.concat(frames, ignore_index=True))
