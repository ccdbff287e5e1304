"""Run metadata in Parquet: append-only parts, compacted per partition, one loader for all.

Layout: ``<base>/run_metadata/<table>/<prompt set>/<backend>/`` holds a ``compacted_*.parquet``
file (every earlier row of the partition) and the parts written since, one Arrow schema per table
(``records.TABLE_SCHEMAS``): pandas, pyarrow, DuckDB and Polars read them as one dataset. A step
writes a part every few seconds or hundred rows, so a step killed after hours loses at most its
last part; two steps writing at the same moment never collide.

Every row gets a unique ``row_id`` when appended. A writer that has written its first part, and
every ``COMPACT_FILES`` parts after it, compacts its partition when it holds more than
``COMPACT_FILES`` files: it reads them all, writes their rows as one new compacted file, and only
then deletes what it read. A reader in between may see a row twice and keeps the first copy of
each ``row_id``; no file is deleted whose rows are not already in a newer one, so rows are never
lost, whatever runs, workers or machines compact at once, and a partition's files stay bounded.

Images and clips keep one *current* row per output: a later row of the same output (regenerated,
recovered) supersedes the earlier one, whose ``superseded_by`` names it. ``load_run_metadata``
returns current rows unless ``history=True``; every row of ``steps`` is current.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from upath import UPath

from imagegen_pipeline.project_config import load_project_config
from imagegen_pipeline.records import RECORD_TYPES, TABLE_SCHEMAS, to_arrow, utc_now
from imagegen_pipeline.storage import Storage

FLUSH_SECONDS = 5.0
FLUSH_ROWS = 256
COMPACT_FILES = 8  # a partition holding more files than this is compacted by its next writer
COMPACTED_PREFIX = "compacted_"
READ_ATTEMPTS = 20  # a compaction may delete a listed file before it is read: list again
# The tables with one current row per output, and the column naming the output.
OUTPUT_IDS = {"images": "image_id", "clips": "clip_id", "batch_jobs": "display_name"}
# Rows that only say an output was found: never the current row of their output.
OBSERVATION_STATUSES = ("skipped_existing",)
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
_RESOLVE_COLUMNS = ("row_id", "recorded_at", "superseded_by", "status")


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


def spare_folder(storage: Storage, table: str, prompt_set: str, backend: str) -> Path:
    """Where a writer parks rows its storage has no room for: a local folder (``$TMPDIR`` unless
    ``metadata_spare_dir`` / IMAGEGEN_METADATA_SPARE_DIR says otherwise), one per storage, table
    and partition."""
    configured = load_project_config().metadata_spare_dir
    root = Path(configured or Path(tempfile.gettempdir()) / "imagegen-spare")
    store = hashlib.sha256(str(storage.base).encode()).hexdigest()[:12]
    return root / store / table / prompt_set / backend


class RunMetadataNotWritten(OSError):
    """A flush found no room; the message says where the rows are now."""


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
        compact_files: int = COMPACT_FILES,
    ) -> None:
        self.storage = storage
        self.table = table
        self.prompt_set = prompt_set
        self.backend = backend
        self.folder = run_metadata_folder(storage, table, prompt_set, backend)
        self.run_id = run_id
        self.flush_seconds = flush_seconds
        self.flush_rows = flush_rows
        self.compact_files = compact_files
        self.parts: list[str] = []
        self.compactions = 0
        self.compaction_error: str | None = None  # compaction is housekeeping: it never raises
        self._pending: list[Any] = []
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()  # writer threads and the model thread both append
        adopt_parked_rows(storage, table, prompt_set, backend)

    def append(self, record: Any) -> None:
        """Add one row; writes a part when enough rows or seconds have gathered."""
        record.row_id = secrets.token_hex(12)
        record.recorded_at = utc_now()
        with self._lock:
            self._pending.append(record)
            due = (
                len(self._pending) >= self.flush_rows
                or time.monotonic() - self._last_flush >= self.flush_seconds
            )
        if due:
            self.flush()

    def flush(self) -> None:
        """Write the rows gathered so far as a new part (nothing when there are none).

        When the storage is full, the rows are parked in the spare folder (or, if that is full
        too, kept for the next flush) and ``RunMetadataNotWritten`` says so."""
        with self._lock:
            rows, self._pending = self._pending, []
            self._last_flush = time.monotonic()
            if not rows:
                return
            name = self._part_name()
            data = parquet_bytes(to_arrow(rows, self.table))
            try:
                self.storage.write_bytes(self.folder / name, data)
            except OSError as error:
                if error.errno not in FULL_DISK:
                    self._pending[:0] = rows
                    raise
                raise self._park(name, data, rows, error) from error
            self.parts.append(str(self.folder / name))
            due = len(self.parts) == 1 or len(self.parts) % self.compact_files == 0
        if due:
            self._compact()

    def close(self) -> None:
        """Write what is left."""
        self.flush()

    def _part_name(self) -> str:
        stamp, token = utc_now().strftime("%Y%m%dT%H%M%S%fZ"), secrets.token_hex(3)
        return f"{stamp}_{self.run_id[:8]}_{len(self.parts):05d}_{token}.parquet"

    def _park(self, name: str, data: bytes, rows: list[Any], error: OSError) -> OSError:
        spare = spare_folder(self.storage, self.table, self.prompt_set, self.backend)
        what = (
            f"Run metadata: {len(rows)} {self.table} row(s) of {self.prompt_set}/{self.backend} "
            f"could not be written to {self.folder} ({os.strerror(error.errno or 0)})."
        )
        try:
            Storage(spare).write_bytes(UPath(spare / name), data)
        except OSError as spare_error:
            self._pending[:0] = rows
            return RunMetadataNotWritten(
                error.errno,
                f"{what} The spare folder {spare} has no room either "
                f"({os.strerror(spare_error.errno or 0)}): the rows are kept in memory and "
                "written by this writer's next flush; if the process ends first, the next run "
                "rebuilds them from the facts embedded in the files.",
            )
        return RunMetadataNotWritten(
            error.errno,
            f"{what} They were written to {spare / name} instead, and the next step of this "
            "partition moves them back: nothing is lost.",
        )

    def _compact(self) -> None:
        try:
            if compact_partition(
                self.storage,
                self.table,
                self.prompt_set,
                self.backend,
                min_files=self.compact_files,
            ):
                self.compactions += 1
        except OSError as error:  # no room, a flaky store: the parts stay, nothing is lost
            self.compaction_error = f"{type(error).__name__}: {error}"


def adopt_parked_rows(storage: Storage, table: str, prompt_set: str, backend: str) -> int:
    """Move the parts a full disk made a writer park in the spare folder back to the storage;
    returns how many were moved."""
    spare = spare_folder(storage, table, prompt_set, backend)
    if not spare.is_dir():
        return 0
    folder = run_metadata_folder(storage, table, prompt_set, backend)
    moved = 0
    for part in sorted(spare.glob("*.parquet")):
        storage.write_bytes(folder / part.name, part.read_bytes())
        part.unlink(missing_ok=True)  # only once its rows are in the storage
        moved += 1
    return moved


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


def _ordered_names(names: Iterable[str]) -> list[str]:
    # Compacted rows first: they were recorded before any part still beside them.
    parquet = [name for name in names if name.endswith(".parquet")]
    return sorted(parquet, key=lambda name: (not name.startswith(COMPACTED_PREFIX), name))


def _conform(table: pa.Table, schema: pa.Schema, name: str) -> pa.Table:
    # Columns a file predates read as nulls; a row predating row ids gets its file and position.
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        elif field.name == "row_id":
            columns.append(pa.array([f"{name}#{i}" for i in range(table.num_rows)], pa.string()))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _read_files(
    storage: Storage, folder: UPath, names: list[str], schema: pa.Schema, current: bool
) -> pa.Table:
    tables = []
    for name in names:
        data = io.BytesIO(storage.read_bytes(folder / name))
        present = set(pq.read_schema(data).names)
        columns = [column for column in schema.names if column in present]
        # Rows superseded before a compaction sit in their own row groups, which planning
        # skips by their statistics, so it reads the current rows only.
        skip = current and name.startswith(COMPACTED_PREFIX) and "superseded_by" in present
        condition = pc.field("superseded_by").is_null() if skip else None
        table = pq.read_table(data, columns=columns, filters=condition)
        tables.append(_conform(table, schema, name))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def resolve(table: pa.Table, name: str) -> pa.Table:
    """A partition's rows with copies left by a compaction dropped, in the order they were
    recorded, and ``superseded_by`` set: each output's last generation row is current."""
    seen: set[str] = set()
    first = []
    for row_id in table.column("row_id").to_pylist():
        first.append(row_id not in seen)
        seen.add(row_id)
    if not all(first):
        table = table.filter(pa.array(first))
    # Arrow's sort is stable: rows recorded at the same instant (or before recorded_at existed,
    # null, first) keep their file order.
    order = pc.sort_indices(table, [("recorded_at", "ascending", "at_start")])
    table = table.take(order)
    id_column = OUTPUT_IDS.get(name)
    if id_column is None:
        return table
    outputs = table.column(id_column).to_pylist()
    statuses = table.column("status").to_pylist()
    row_ids = table.column("row_id").to_pylist()
    superseded: list[str | None] = [None] * len(row_ids)
    later: dict[str, str] = {}  # output -> the row after, walking back from the newest
    current: dict[str, str] = {}  # output -> its newest generation row
    observed = []
    for index in range(len(row_ids) - 1, -1, -1):
        if statuses[index] in OBSERVATION_STATUSES:
            observed.append(index)
            continue
        superseded[index] = later.get(outputs[index])
        later[outputs[index]] = row_ids[index]
        current.setdefault(outputs[index], row_ids[index])
    for index in observed:  # history only: under the output's current row, or their own
        superseded[index] = current.get(outputs[index], row_ids[index])
    position = table.schema.get_field_index("superseded_by")
    return table.set_column(position, "superseded_by", pa.array(superseded, pa.string()))


def _read_partition(
    storage: Storage, folder: UPath, names: list[str], table: str, schema: pa.Schema, current: bool
) -> tuple[pa.Table, int]:
    for attempt in range(READ_ATTEMPTS):
        try:
            rows = _read_files(storage, folder, _ordered_names(names), schema, current)
        except FileNotFoundError:
            if attempt == READ_ATTEMPTS - 1:
                raise
            # A compaction deleted a listed part: its rows are in the compacted file now.
            names = list(storage.list_files(folder))
            continue
        # A listing is no snapshot: one taken while a compaction ran can miss both the file it
        # wrote and the parts it then deleted. A compacted file that the listing lacked says
        # that may have happened (it is written before any part is deleted): read again.
        again = list(storage.list_files(folder))
        if attempt == READ_ATTEMPTS - 1 or not {
            name for name in again if name.startswith(COMPACTED_PREFIX)
        } - set(names):
            return resolve(rows, table), len(names)
        names = again
    raise AssertionError("unreachable")


def _load(
    storage: Storage,
    table: str,
    prompt_set: str | None,
    backend: str | None,
    *,
    history: bool,
    columns: Sequence[str] | None,
) -> tuple[pa.Table, int]:
    folder = run_metadata_folder(storage, table, prompt_set, backend)
    full = TABLE_SCHEMAS[table]
    wanted = list(columns or full.names)
    needed = {*wanted, *_RESOLVE_COLUMNS, OUTPUT_IDS.get(table, "row_id")}
    schema = pa.schema([field for field in full if field.name in needed])
    by_partition: dict[str, list[str]] = {}
    for relative in storage.list_files(folder):
        path = PurePosixPath(relative)
        by_partition.setdefault(str(path.parent), []).append(path.name)
    tables, files = [], 0
    for partition, names in sorted(by_partition.items()):
        where = folder if partition == "." else folder.joinpath(*PurePosixPath(partition).parts)
        rows, count = _read_partition(storage, where, names, table, schema, not history)
        if not history and table in OUTPUT_IDS:
            rows = rows.filter(pc.field("superseded_by").is_null())
        tables.append(rows)
        files += count
    rows = pa.concat_tables(tables) if tables else schema.empty_table()
    return rows.select(wanted), files


def load_run_metadata(
    base: str | Storage | os.PathLike[str],
    table: str = "images",
    *,
    prompt_set: str | None = None,
    backend: str | None = None,
    history: bool = False,
    columns: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The rows of ``table`` under ``base`` (optionally one partition's) as pandas.

    Images and clips: one current row per output, or every row ever written with
    ``history=True`` (superseded ones name their successor in ``superseded_by``)."""
    storage = base if isinstance(base, Storage) else Storage(base)
    rows, _ = _load(storage, table, prompt_set, backend, history=history, columns=columns)
    return rows.to_pandas()


def compact_partition(
    storage: Storage,
    table: str,
    prompt_set: str,
    backend: str,
    *,
    min_files: int = COMPACT_FILES,
) -> bool:
    """Rewrite one partition's files as one compacted file when it holds more than
    ``min_files``; True when it did. Safe beside writers, readers and other compactions."""
    folder = run_metadata_folder(storage, table, prompt_set, backend)
    schema = TABLE_SCHEMAS[table]
    for _ in range(READ_ATTEMPTS):
        names = _ordered_names(storage.list_files(folder))
        if len(names) <= min_files:
            return False
        try:
            rows = resolve(_read_files(storage, folder, names, schema, current=False), table)
            break
        except FileNotFoundError:
            # Another compaction took some of these files: its file holds their rows now,
            # and parts written since it listed are still ours to fold in, so list again.
            continue
    else:
        return False
    stamp = utc_now().strftime("%Y%m%dT%H%M%S%fZ")
    buffer = io.BytesIO()
    with pq.ParquetWriter(buffer, rows.schema) as parquet:
        if table in OUTPUT_IDS:  # superseded rows first: each output's rows keep their order
            parquet.write_table(rows.filter(pc.field("superseded_by").is_valid()))
            rows = rows.filter(pc.field("superseded_by").is_null())
        parquet.write_table(rows)
    name = f"{COMPACTED_PREFIX}{stamp}_{secrets.token_hex(4)}.parquet"
    storage.write_bytes(folder / name, buffer.getvalue())
    for listed in names:  # only now: every row read is in the new file
        storage.delete(folder / listed)
    return True


def planning_rows(
    storage: Storage, table: str, columns: list[str], *, prompt_set: str, backend: str
) -> pd.DataFrame:
    """The current rows of a partition, ``columns`` only, for a step planning its work.

    Costs the same however long the partition's history: rows a full disk parked are moved
    back first, and a partition left with too many files (parts from before compaction, or
    from killed writers) is compacted."""
    adopt_parked_rows(storage, table, prompt_set, backend)
    rows, files = _load(storage, table, prompt_set, backend, history=False, columns=columns)
    if files > COMPACT_FILES:
        compact_partition(storage, table, prompt_set, backend)
    return rows.to_pandas()
