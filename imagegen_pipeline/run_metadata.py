"""Run metadata in Parquet: append-only parts, flushed while a step runs, one loader for all.

Layout: ``<base>/run_metadata/<table>/<prompt set>/<backend>/<time>_<run>_<part>.parquet``.
Each table has one Arrow schema (``records.TABLE_SCHEMAS``), so all its files read as one
dataset in pandas, pyarrow, DuckDB (``read_parquet('.../images/*/*/*.parquet')``) or Polars.
A step writes a new part every few seconds or every few hundred rows, so a step killed after
hours loses at most its last part; two steps writing at the same moment never collide.
"""

from __future__ import annotations

import hashlib
import io
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from imagegen_pipeline.records import RECORD_TYPES, TABLE_SCHEMAS, to_arrow, utc_now
from imagegen_pipeline.storage import Storage

FLUSH_SECONDS = 5.0
FLUSH_ROWS = 256


def run_metadata_folder(
    storage: Storage, table: str, prompt_set: str | None = None, backend: str | None = None
) -> UPath:
    """The folder of a table, or of one partition's files of it."""
    if table not in RECORD_TYPES:
        raise ValueError(f"unknown run-metadata table {table!r}; known: {sorted(RECORD_TYPES)}")
    parts = [part for part in (prompt_set, backend) if part]
    return storage.path("run_metadata", table, *parts)


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as the bytes of a Parquet file."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


class RunMetadataWriter:
    """Appends one partition's rows of one table, a new Parquet part at a time."""

    def __init__(
        self,
        storage: Storage,
        table: str,
        *,
        run_id: str,
        prompt_set: str,
        backend: str,
        flush_seconds: float = FLUSH_SECONDS,
        flush_rows: int = FLUSH_ROWS,
    ) -> None:
        self.storage = storage
        self.table = table
        self.folder = run_metadata_folder(storage, table, prompt_set, backend)
        self.run_id = run_id
        self.flush_seconds = flush_seconds
        self.flush_rows = flush_rows
        self.parts: list[str] = []
        self._pending: list[Any] = []
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()  # writer threads and the model thread both append

    def append(self, record: Any) -> None:
        """Add one row; writes a part when enough rows or seconds have gathered."""
        with self._lock:
            self._pending.append(record)
            due = (
                len(self._pending) >= self.flush_rows
                or time.monotonic() - self._last_flush >= self.flush_seconds
            )
        if due:
            self.flush()

    def flush(self) -> None:
        """Write the rows gathered so far as a new part (nothing when there are none)."""
        with self._lock:
            rows, self._pending = self._pending, []
            self._last_flush = time.monotonic()
            if not rows:
                return
            stamp = utc_now().strftime("%Y%m%dT%H%M%S%fZ")
            name = f"{stamp}_{self.run_id[:8]}_{len(self.parts):05d}_{secrets.token_hex(3)}.parquet"
            path = self.folder / name
            self.storage.write_bytes(path, parquet_bytes(to_arrow(rows, self.table)))
            self.parts.append(str(path))

    def close(self) -> None:
        """Write what is left."""
        self.flush()


def write_records(
    storage: Storage,
    table: str,
    records: Sequence[Any],
    *,
    run_id: str,
    prompt_set: str,
    backend: str,
) -> str | None:
    """Write ``records`` as one part at once; returns its path (None for no rows)."""
    writer = RunMetadataWriter(
        storage, table, run_id=run_id, prompt_set=prompt_set, backend=backend
    )
    for record in records:
        writer.append(record)
    writer.close()
    return writer.parts[-1] if writer.parts else None


def load_run_metadata(
    base: str | Storage,
    table: str = "images",
    *,
    prompt_set: str | None = None,
    backend: str | None = None,
) -> pd.DataFrame:
    """Every row written to ``table`` under ``base`` (optionally one partition's) as pandas."""
    storage = base if isinstance(base, Storage) else Storage(base)
    folder = run_metadata_folder(storage, table, prompt_set, backend)
    schema = TABLE_SCHEMAS[table]
    names = sorted(name for name in storage.list_files(folder) if name.endswith(".parquet"))
    if not names:
        return schema.empty_table().to_pandas()
    # Read with the table's schema: files written before a column existed read back with nulls.
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(folder / name))) for name in names]
    aligned = [_conform(t, schema) for t in tables]
    return pa.concat_tables(aligned).to_pandas()


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    columns = [
        table.column(field.name).cast(field.type)
        if field.name in table.column_names
        else pa.nulls(table.num_rows, field.type)
        for field in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


@dataclass
class FinishedOutputs:
    """The outputs of a partition that have a generation row (status ok): id -> (sha256, size)."""

    made: dict[str, tuple[str | None, int | None]]

    def __contains__(self, output_id: str) -> bool:
        return output_id in self.made

    def sha256_now(
        self, storage: Storage, path: UPath, output_id: str, size: int, log: Callable[[str], None]
    ) -> str | None:
        """The recorded sha256 of a file found by a listing, or, when its size says it was
        replaced under its name since it was made, the sha256 of what is there now."""
        sha256, recorded_size = self.made.get(output_id, (None, None))
        if recorded_size is not None and recorded_size != size:
            log(f"{path} changed since it was made ({recorded_size} -> {size} bytes).")
            return hashlib.sha256(storage.read_bytes(path)).hexdigest()
        return sha256


def finished_outputs(
    storage: Storage, table: str, id_column: str, *, prompt_set: str, backend: str
) -> FinishedOutputs:
    """What the run metadata of a partition says was made, by output id."""
    rows = load_run_metadata(storage, table, prompt_set=prompt_set, backend=backend)
    made = rows[rows["status"] == "ok"].drop_duplicates(id_column, keep="last")
    return FinishedOutputs(
        {
            row[id_column]: (row["sha256"], None if pd.isna(row["bytes"]) else int(row["bytes"]))
            for row in made.to_dict("records")
        }
    )
