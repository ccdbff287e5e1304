"""The skeleton every generating step shares (images, video clips), Dagster-free.

A step is an ``OutputKind`` (what its files are, how to check, recover, produce, write and
record one output) run by ``run_step``: sweep what killed runs left -> list the outputs once ->
verify what exists (``steps.verify``: a damaged file is moved aside and made again) -> load the
model only if something is missing -> produce -> write. Writing (encoding, hashing, the atomic
write, building the row) runs on a few writer threads while the model makes the next batch; the
encoders release the GIL, so an accelerator is not left idle while PNGs or MP4s are encoded.
At most ``max_in_flight`` results wait for a writer, so memory stays flat however long the step.
Rows reach the run metadata in the order the model produced them, flushed every few seconds.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from imagegen_pipeline.progress import Progress
from imagegen_pipeline.records import utc_now
from imagegen_pipeline.run_metadata import RunMetadataWriter
from imagegen_pipeline.steps.verify import PartitionFiles, VerifyMode
from imagegen_pipeline.storage import Storage

P = TypeVar("P")  # a planned item
R = TypeVar("R")  # its record
T = TypeVar("T")
P_contra = TypeVar("P_contra", contravariant=True)

DEFAULT_WRITER_THREADS = 2
DEFAULT_MAX_IN_FLIGHT = 16


class OrderedWriter(Generic[T]):
    """Runs jobs on ``threads`` threads and hands back their results in submission order.

    With ``threads=0`` every job runs at once on the caller's thread (writing on the model
    thread, as a baseline). ``submit`` blocks while ``max_in_flight`` jobs are unfinished.
    """

    def __init__(self, threads: int, max_in_flight: int, on_result: Callable[[T], None]) -> None:
        self.on_result = on_result
        self.max_in_flight = max(1, max_in_flight)
        self._pool = ThreadPoolExecutor(threads, "writer") if threads > 0 else None
        self._pending: deque[Future[T]] = deque()

    def submit(self, job: Callable[..., T], *args: Any) -> None:
        """Queue ``job(*args)``; first hands back the oldest results if too many are pending."""
        if self._pool is None:
            self.on_result(job(*args))
            return
        while len(self._pending) >= self.max_in_flight:
            self.on_result(self._pending.popleft().result())
        self._pending.append(self._pool.submit(job, *args))
        # Hand back whatever is already finished, in order, without waiting.
        while self._pending and self._pending[0].done():
            self.on_result(self._pending.popleft().result())

    def drain(self) -> None:
        """Wait for every job and hand back the rest of the results."""
        while self._pending:
            self.on_result(self._pending.popleft().result())

    def close(self) -> None:
        """Finish what is queued and stop the threads."""
        try:
            self.drain()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class StepOutcome(Generic[R]):
    """What one step did: a record per planned item, in plan order, plus its totals."""

    records: list[R]
    generated: int = 0  # items whose generation was attempted in this step
    seconds: float = 0.0
    load_seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    damaged: list[str] = field(default_factory=list)  # why each damaged file was moved aside


class Maker(Protocol[P_contra]):
    """What makes missing outputs: ``load`` the model (returns seconds spent), ``produce``
    yields ``(item, result)`` in any order, ``write`` (on a writer thread) returns the record."""

    def key(self, item: P_contra) -> Hashable: ...
    def load(self) -> float: ...
    def produce(self, items: list[Any]) -> Iterator[tuple[Any, Any]]: ...
    def write(self, item: Any, result: Any) -> Any: ...


class OutputKind(Maker[P_contra], Protocol):
    """One kind of output file set (images, video clips) and how to handle one of them.

    ``files(item)`` are its paths under the partition folder, the first the main file (whose
    sha256 and size rows record); an item is done when all exist. ``check(item, data)`` raises
    one of ``image_files.DECODE_ERRORS`` when the main file's bytes do not decode.
    ``recover(item)`` reads the facts a file carries (its run id among them) to rebuild a row
    lost when a run was killed; ``record`` builds a row; ``derived(item)`` lists files made from
    the item elsewhere, invalidated with it when it is damaged."""

    table: str  # its run-metadata table
    id_column: str  # the content address column of that table
    folder_parts: tuple[str, ...]  # the partition folder under the storage base
    what: str  # for log lines

    def files(self, item: P_contra) -> tuple[str, ...]: ...
    def output_id(self, item: P_contra) -> str: ...
    def check(self, item: P_contra, data: bytes) -> None: ...
    def recover(self, item: P_contra) -> dict[str, Any]: ...
    def record(self, item: P_contra, status: str, run_id: str, **facts: Any) -> Any: ...
    def derived(self, item: P_contra) -> list[Any]: ...


@dataclass(frozen=True)
class StepPlace:
    """Where a step runs: its store, partition and run, and how it writes and verifies."""

    storage: Storage
    prompt_set: str
    backend: str
    run_id: str
    writer_threads: int = DEFAULT_WRITER_THREADS
    verify: VerifyMode = "size"


def run_step(
    kind: OutputKind[P],
    planned: Sequence[P],
    place: StepPlace,
    log: Callable[[str], None],
) -> StepOutcome[Any]:
    """Make every planned output that is not there whole, and describe every one.

    What exists is verified first (size against its row, decoding, and under ``verify="hash"``
    its sha256): a damaged file, and what was made from it, is moved to the quarantine with a
    ``damaged`` row, then made again like a missing one. Existing outputs get a
    ``skipped_existing`` record in the outcome but no run-metadata row: a run that makes
    nothing writes only its step row. A row lost by a killed run is rebuilt from the file.
    """
    started = time.perf_counter()
    storage = place.storage
    metadata = RunMetadataWriter(
        storage, kind.table, run_id=place.run_id, prompt_set=place.prompt_set, backend=place.backend
    )
    files = PartitionFiles.survey(storage, kind.folder_parts, kind.table, kind.id_column, place)
    if files.swept:
        log(f"Removed {files.swept} temporary file(s) left by an interrupted run.")
    found: dict[Hashable, Any] = {}
    damage: dict[Hashable, str] = {}
    for item in planned:
        names = kind.files(item)
        if not files.all_listed(names):
            note = files.pending_damage(kind.output_id(item))
            if note:
                damage[kind.key(item)] = note
            continue
        state = files.inspect(kind, item, names, place.verify)
        if state.recovered is not None:
            metadata.append(state.recovered)
        if state.damage is None:
            found[kind.key(item)] = state.existing
            continue
        moved = files.quarantine(kind, item, names, log)
        metadata.append(
            kind.record(
                item,
                "damaged",
                place.run_id,
                error=state.damage,
                path=moved,
                sha256=state.recorded_sha256,
                bytes=state.size,
                started_at=utc_now(),
                finished_at=utc_now(),
            )
        )
        damage[kind.key(item)] = state.damage
    outcome = run_generation_step(
        kind,
        planned,
        found,
        metadata,
        log,
        what=kind.what,
        writer_threads=place.writer_threads,
        notes=damage,
    )
    outcome.seconds = time.perf_counter() - started
    outcome.damaged = [f"{key}: {note}" for key, note in damage.items()]
    return outcome


def run_generation_step(
    maker: Maker[P],
    planned: Sequence[P],
    found: dict[Hashable, R],
    metadata: RunMetadataWriter,
    log: Callable[[str], None],
    *,
    what: str,
    writer_threads: int = DEFAULT_WRITER_THREADS,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    notes: dict[Hashable, str] | None = None,
) -> StepOutcome[R]:
    """Make the planned items not in ``found`` (records of what exists, by key); see the
    module docstring. ``notes`` (by key) become the ``damage`` of the records made."""
    started = time.perf_counter()
    by_key: dict[Hashable, R] = dict(found)
    todo = [item for item in planned if maker.key(item) not in found]
    notes = notes or {}
    load_seconds = 0.0
    if todo:
        # Only sets with work get a line: every line is an event-log write, and a backfill
        # over hundreds of finished sets would pay for hundreds of "0 to make" (the step
        # logs its totals once).
        existing = len(planned) - len(todo)
        log(f"{what}: {len(planned)} planned, {existing} exist, {len(todo)} to make.")
        load_seconds = maker.load()
        progress = Progress(what, len(todo), log)

        def made(item: P, result: Any) -> tuple[Hashable, R]:
            record = maker.write(item, result)
            note = notes.get(maker.key(item))
            if note:
                record.damage = note  # type: ignore[attr-defined]
            return maker.key(item), record

        def keep(pair: tuple[Hashable, R]) -> None:
            item_key, record = pair
            by_key[item_key] = record
            metadata.append(record)
            progress.advance()

        writer: OrderedWriter[tuple[Hashable, R]] = OrderedWriter(
            writer_threads, max_in_flight, keep
        )
        try:
            for item, result in maker.produce(todo):
                writer.submit(made, item, result)
        finally:
            # Whatever stopped the step, the rows of everything already written are kept.
            try:
                writer.close()
            finally:
                metadata.flush()
        progress.finish()
    metadata.flush()
    records = [by_key[maker.key(item)] for item in planned]
    counts: dict[str, int] = {}
    for record in records:
        status = getattr(record, "status", "")
        counts[status] = counts.get(status, 0) + 1
    return StepOutcome(
        records=records,
        generated=len(todo),
        seconds=time.perf_counter() - started,
        load_seconds=load_seconds,
        counts=counts,
    )
