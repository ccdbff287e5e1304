"""The skeleton every generating step shares (images, video clips), Dagster-free.

plan -> sweep what killed runs left -> list the outputs once -> describe what exists -> load the
model only if something is missing -> generate -> write. Writing (encoding, hashing, the atomic
write, building the row) runs on a few writer threads while the model makes the next batch; the
encoders release the GIL, so an accelerator is not left idle while PNGs or MP4s are encoded.
At most ``max_in_flight`` results wait for a writer, so memory stays flat however long the step.
Rows reach the run metadata in the order the model produced them, flushed every few seconds.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from imagegen_pipeline.progress import Progress
from imagegen_pipeline.run_metadata import RunMetadataWriter

P = TypeVar("P")  # a planned item
R = TypeVar("R")  # its record
T = TypeVar("T")

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


def run_generation_step(
    *,
    what: str,
    planned: Sequence[P],
    key: Callable[[P], Hashable],
    is_done: Callable[[P], bool],
    describe_existing: Callable[[P], Iterable[R]],
    load: Callable[[], float],
    generate: Callable[[list[P]], Iterator[tuple[P, Any]]],
    write: Callable[[P, Any], R],
    metadata: RunMetadataWriter,
    log: Callable[[str], None],
    writer_threads: int = DEFAULT_WRITER_THREADS,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
) -> StepOutcome[R]:
    """Make every planned item that is not done yet; see the module docstring.

    ``describe_existing(item)`` yields the rows of an item found done: its ``skipped_existing``
    row last (earlier ones, e.g. a generation row rebuilt after a kill, go to the metadata only).
    ``generate(items)`` drives the model and yields ``(item, result)`` in any order; ``write``
    runs on a writer thread and returns the item's record.
    """
    started = time.perf_counter()
    by_key: dict[Hashable, R] = {}
    todo: list[P] = []
    for item in planned:
        if not is_done(item):
            todo.append(item)
            continue
        for record in describe_existing(item):
            metadata.append(record)
            by_key[key(item)] = record
    load_seconds = 0.0
    if todo:
        # Only sets with work get a line: every line is an event-log write, and a backfill
        # over hundreds of finished sets would pay for hundreds of "0 to make" (the step
        # logs its totals once).
        existing = len(planned) - len(todo)
        log(f"{what}: {len(planned)} planned, {existing} exist, {len(todo)} to make.")
        load_seconds = load()
        progress = Progress(what, len(todo), log)

        def keep(pair: tuple[Hashable, R]) -> None:
            item_key, record = pair
            by_key[item_key] = record
            metadata.append(record)
            progress.advance()

        writer: OrderedWriter[tuple[Hashable, R]] = OrderedWriter(
            writer_threads, max_in_flight, keep
        )
        try:
            for item, result in generate(todo):
                writer.submit(lambda i, r: (key(i), write(i, r)), item, result)
        finally:
            # Whatever stopped the step, the rows of everything already written are kept.
            try:
                writer.close()
            finally:
                metadata.flush()
        progress.finish()
    metadata.flush()
    records = [by_key[key(item)] for item in planned]
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
