"""The generating steps' skeleton: ordered overlapped writers, skips, loads and metadata rows."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imagegen_pipeline.records import ImageRecord
from imagegen_pipeline.run_metadata import RunMetadataWriter, load_run_metadata
from imagegen_pipeline.steps.skeleton import OrderedWriter, run_generation_step
from imagegen_pipeline.storage import Storage

# --- OrderedWriter --------------------------------------------------------------------------


def test_results_come_back_in_submission_order() -> None:
    rng = random.Random(7)
    delays = [rng.uniform(0.0, 0.02) for _ in range(40)]
    finished: list[int] = []
    results: list[int] = []
    lock = threading.Lock()

    def job(index: int) -> int:
        time.sleep(delays[index])
        with lock:
            finished.append(index)
        return index

    writer = OrderedWriter(threads=4, max_in_flight=8, on_result=results.append)
    for index in range(40):
        writer.submit(job, index)
    writer.close()

    assert results == list(range(40))
    assert finished != list(range(40))  # the jobs really did finish out of order


@dataclass
class Gauge:
    """Counts jobs started and not yet handed back, and jobs running, with a lock."""

    running: int = 0
    max_running: int = 0
    max_unreturned: int = 0
    started: int = 0
    returned: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def job(self, index: int) -> int:
        with self.lock:
            self.started += 1
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.max_unreturned = max(self.max_unreturned, self.started - self.returned)
        time.sleep(0.02)
        with self.lock:
            self.running -= 1
        return index

    def on_result(self, index: int) -> None:
        with self.lock:
            self.returned += 1


@pytest.mark.parametrize("max_in_flight", [1, 2, 3])
def test_at_most_max_in_flight_unfinished(max_in_flight: int) -> None:
    gauge = Gauge()
    writer = OrderedWriter(threads=6, max_in_flight=max_in_flight, on_result=gauge.on_result)
    for index in range(12):
        writer.submit(gauge.job, index)
    writer.close()

    assert gauge.returned == 12
    assert gauge.max_running <= max_in_flight
    assert gauge.max_unreturned <= max_in_flight
    if max_in_flight > 1:
        assert gauge.max_running > 1  # the threads do overlap within the limit


def test_threads_zero_runs_inline() -> None:
    caller = threading.get_ident()
    ran_on: list[int] = []
    results: list[str] = []

    def job(text: str) -> str:
        ran_on.append(threading.get_ident())
        return text.upper()

    writer = OrderedWriter(threads=0, max_in_flight=4, on_result=results.append)
    writer.submit(job, "a")
    assert results == ["A"]  # handed back before submit returned
    writer.submit(job, "b")
    writer.close()
    assert results == ["A", "B"]
    assert ran_on == [caller, caller]


def test_a_failing_job_raises_in_the_caller() -> None:
    def job(index: int) -> int:
        if index == 2:
            raise ValueError("encoder failed")
        return index

    results: list[int] = []
    writer = OrderedWriter(threads=2, max_in_flight=2, on_result=results.append)
    with pytest.raises(ValueError, match="encoder failed"):
        for index in range(6):
            writer.submit(job, index)
        writer.drain()
    writer.close()  # the failed job was handed back (raised); the rest finish
    assert results[:2] == [0, 1]
    assert 2 not in results


# --- run_generation_step --------------------------------------------------------------------


@dataclass
class Row:
    item: str
    status: str


class FakeMetadata:
    """A metadata writer that remembers what was appended, and what a flush made durable."""

    def __init__(self) -> None:
        self.appended: list[Row] = []
        self.flushed: list[Row] = []

    def append(self, record: Row) -> None:
        self.appended.append(record)

    def flush(self) -> None:
        self.flushed = list(self.appended)


@dataclass
class Step:
    """One step's callbacks, recording how they were called."""

    planned: list[str]
    done: set[str]
    order: list[str] | None = None  # generation order; default: reversed todo
    fail_after: int | None = None
    loads: int = 0
    generated_batches: list[list[str]] = field(default_factory=list)
    write_threads: set[int] = field(default_factory=set)
    logs: list[str] = field(default_factory=list)

    def load(self) -> float:
        self.loads += 1
        return 0.25

    def key(self, item: str) -> str:
        return item

    def produce(self, items: list[str]) -> Iterator[tuple[str, str]]:
        self.generated_batches.append(list(items))
        order = self.order if self.order is not None else list(reversed(items))
        for count, item in enumerate(order):
            if self.fail_after is not None and count == self.fail_after:
                raise RuntimeError("model crashed")
            yield item, f"pixels of {item}"

    def write(self, item: str, result: str) -> Row:
        time.sleep(random.uniform(0.0, 0.01))
        self.write_threads.add(threading.get_ident())
        assert result == f"pixels of {item}"
        return Row(item, "ok")

    def run(self, metadata: object, **kwargs: object):
        found = {item: Row(item, "skipped_existing") for item in self.planned if item in self.done}
        return run_generation_step(
            self,
            self.planned,
            found,
            metadata,  # type: ignore[arg-type]
            self.logs.append,
            what="images",
            **kwargs,  # type: ignore[arg-type]
        )


def test_everything_done_skips_and_never_loads() -> None:
    step = Step(planned=["a", "b"], done={"a", "b"})
    metadata = FakeMetadata()
    outcome = step.run(metadata)

    assert step.loads == 0
    assert step.generated_batches == []
    assert [(r.item, r.status) for r in outcome.records] == [
        ("a", "skipped_existing"),
        ("b", "skipped_existing"),
    ]
    assert outcome.generated == 0
    assert outcome.load_seconds == 0.0
    assert outcome.counts == {"skipped_existing": 2}
    # A run that makes nothing writes no row per existing item: the step row counts them.
    assert metadata.flushed == []
    # A set with nothing to make logs nothing: the Dagster step logs its totals once.
    assert step.logs == []


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_makes_only_the_missing_items(threads: int) -> None:
    planned = [f"i{n}" for n in range(10)]
    step = Step(planned=planned, done={"i1", "i4", "i5"})
    metadata = FakeMetadata()
    outcome = step.run(metadata, writer_threads=threads, max_in_flight=2)

    todo = [item for item in planned if item not in {"i1", "i4", "i5"}]
    assert step.loads == 1
    assert step.generated_batches == [todo]
    # Records in plan order, whatever order the model produced them in.
    assert [r.item for r in outcome.records] == planned
    assert [r.status for r in outcome.records] == [
        "skipped_existing" if item in {"i1", "i4", "i5"} else "ok" for item in planned
    ]
    # Generated rows, and only they, reach the metadata, in generation order.
    assert [r.item for r in metadata.flushed] == list(reversed(todo))
    assert metadata.flushed == metadata.appended
    assert outcome.generated == 7
    assert outcome.load_seconds == 0.25
    assert outcome.counts == {"ok": 7, "skipped_existing": 3}
    if threads == 0:
        assert step.write_threads == {threading.get_ident()}
    else:
        assert threading.get_ident() not in step.write_threads
    assert any("images: 7/7" in line for line in step.logs)
    assert any("10 planned, 3 exist, 7 to make" in line for line in step.logs)


def test_generation_order_is_what_the_model_yields() -> None:
    step = Step(planned=["a", "b", "c", "d"], done=set(), order=["c", "a", "d", "b"])
    metadata = FakeMetadata()
    outcome = step.run(metadata, writer_threads=2)
    assert [r.item for r in metadata.flushed] == ["c", "a", "d", "b"]
    assert [r.item for r in outcome.records] == ["a", "b", "c", "d"]


def test_a_crash_midway_still_flushes_the_finished_rows() -> None:
    step = Step(planned=["a", "b", "c", "d", "e"], done={"a"}, order=["b", "c", "d", "e"])
    step.fail_after = 2  # "b" and "c" are made, then the model crashes
    metadata = FakeMetadata()
    with pytest.raises(RuntimeError, match="model crashed"):
        step.run(metadata, writer_threads=2, max_in_flight=4)
    assert [(r.item, r.status) for r in metadata.flushed] == [
        ("b", "ok"),
        ("c", "ok"),
    ]


def image_row(item: str, status: str = "ok") -> ImageRecord:
    return ImageRecord(
        run_id="run-1",
        prompt_set="s",
        backend="flux_schnell",
        image_id=item,
        prompt_id=item,
        image_index=0,
        prompt="p",
        negative_prompt="",
        model_id="m",
        revision="main",
        seed=0,
        width=8,
        height=8,
        steps=1,
        guidance=0.0,
        status=status,
    )


def test_a_crash_midway_leaves_the_finished_rows_on_disk(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    # Nothing would be flushed by size or time before the step ends.
    metadata = RunMetadataWriter(
        storage,
        "images",
        run_id="run-1",
        prompt_set="s",
        backend="flux_schnell",
        flush_seconds=3600,
        flush_rows=1000,
    )

    class Maker:
        def key(self, item: str) -> str:
            return item

        def load(self) -> float:
            return 0.0

        def produce(self, items: list[str]) -> Iterator[tuple[str, None]]:
            yield items[0], None
            yield items[1], None
            raise RuntimeError("killed by the out-of-memory killer")

        def write(self, item: str, _: None) -> ImageRecord:
            return image_row(item)

    found = {"x": image_row("x", "skipped_existing")}
    with pytest.raises(RuntimeError, match="out-of-memory"):
        run_generation_step(Maker(), ["x", "y", "z", "w"], found, metadata, print, what="images")
    frame = load_run_metadata(storage, "images", history=True)
    assert list(zip(frame["image_id"], frame["status"], strict=True)) == [
        ("y", "ok"),
        ("z", "ok"),
    ]
