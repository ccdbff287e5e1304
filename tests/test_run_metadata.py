"""Run metadata: append-only Parquet parts, one schema per table, readable by every reader."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagegen_pipeline import run_metadata as run_metadata_module
from imagegen_pipeline.records import TABLE_SCHEMAS, ImageRecord, StepRecord
from imagegen_pipeline.run_metadata import (
    RunMetadataWriter,
    load_run_metadata,
    run_metadata_folder,
    write_records,
)
from imagegen_pipeline.storage import Storage

IMAGE_COLUMNS = TABLE_SCHEMAS["images"].names
STARTED = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def image(run_id: str, index: int, prompt_set: str = "s", backend: str = "flux_schnell"):
    return ImageRecord(
        run_id=run_id,
        prompt_set=prompt_set,
        backend=backend,
        image_id=f"{run_id}-{index}",
        prompt_id="p",
        image_index=index,
        prompt="a cat",
        negative_prompt="",
        model_id="m",
        revision="main",
        seed=index,
        width=64,
        height=64,
        steps=1,
        guidance=0.0,
        status="ok",
        seconds=0.5,
        started_at=STARTED,
    )


def write(store: Storage, run_id: str, prompt_set: str, backend: str, count: int) -> str | None:
    records = [image(run_id, i, prompt_set, backend) for i in range(count)]
    return write_records(
        store, "images", records, run_id=run_id, prompt_set=prompt_set, backend=backend
    )


def writer(store: Storage, run_id: str = "run-a", **kwargs) -> RunMetadataWriter:
    options = {"prompt_set": "s", "backend": "flux_schnell", "flush_seconds": 3600.0} | kwargs
    return RunMetadataWriter(store, "images", run_id=run_id, **options)


# --- ported from the old test_run_metadata.py -----------------------------------------------


def test_two_runs_keep_each_others_rows(tmp_path: Path) -> None:
    store = Storage(tmp_path)
    first = write(store, "run-a", "s", "flux_schnell", 2)
    second = write(store, "run-b", "s", "flux_schnell", 3)
    assert first is not None and second is not None and first != second
    assert Path(first).is_file() and Path(second).is_file()

    frame = load_run_metadata(tmp_path, "images")
    assert sorted(frame["run_id"].value_counts().items()) == [("run-a", 2), ("run-b", 3)]
    assert list(frame.columns) == IMAGE_COLUMNS
    assert frame["cost_usd"].isna().all()
    assert (frame["seconds"] == 0.5).all()
    assert frame["started_at"].iloc[0] == pd.Timestamp(STARTED)


def test_every_reader_sees_the_same_rows_with_one_schema(tmp_path: Path) -> None:
    store = Storage(tmp_path)
    for run_id, prompt_set, backend in [("r1", "s", "flux_schnell"), ("r2", "t", "gemini")]:
        write(store, run_id, prompt_set, backend, 2)
    folder = tmp_path / "run_metadata" / "images"
    files = sorted(folder.glob("*/*/*.parquet"))
    assert [f.relative_to(folder).parts[:2] for f in files] == [
        ("s", "flux_schnell"),
        ("t", "gemini"),
    ]
    assert {pq.read_schema(f).remove_metadata() for f in files} == {TABLE_SCHEMAS["images"]}

    glob = f"{folder}/*/*/*.parquet"
    assert pq.read_table([str(f) for f in files]).num_rows == 4
    assert pq.ParquetDataset([str(f) for f in files]).read().num_rows == 4
    assert duckdb.sql(f"select count(*), sum(seed) from read_parquet('{glob}')").fetchall() == [
        (4, 2)
    ]
    polars_frame = pl.read_parquet(glob)
    assert polars_frame.height == 4
    assert polars_frame.columns == IMAGE_COLUMNS
    assert len(load_run_metadata(tmp_path)) == 4


def test_empty_and_unknown_tables(tmp_path: Path) -> None:
    steps = load_run_metadata(tmp_path, "steps")
    assert steps.empty
    assert list(steps.columns) == TABLE_SCHEMAS["steps"].names
    assert (
        write_records(
            Storage(tmp_path), "images", [], run_id="r", prompt_set="s", backend="flux_schnell"
        )
        is None
    )
    assert not (tmp_path / "run_metadata").exists()
    with pytest.raises(ValueError, match="unknown run-metadata table 'nope'"):
        load_run_metadata(tmp_path, "nope")


def test_files_written_before_a_column_existed_read_back_with_nulls(tmp_path: Path) -> None:
    store = Storage(tmp_path)
    write_records(
        store, "images", [image("new", 0)], run_id="new", prompt_set="s", backend="flux_schnell"
    )
    # An older file: no cost_usd / recovered / finished_at columns, seed stored as int32.
    old = pa.table(
        {
            "run_id": ["old"],
            "prompt_set": ["s"],
            "backend": ["flux_schnell"],
            "image_id": ["old-0"],
            "seed": pa.array([5], pa.int32()),
            "status": ["ok"],
        }
    )
    folder = run_metadata_folder(store, "images", "s", "flux_schnell")
    pq.write_table(old, Path(folder.path) / "20200101T000000000000Z_old_00000_abcdef.parquet")

    frame = load_run_metadata(tmp_path, "images").set_index("run_id")
    assert list(frame.reset_index().columns) == IMAGE_COLUMNS
    assert frame.loc["old", "seed"] == 5
    assert pd.isna(frame.loc["old", "cost_usd"])
    assert pd.isna(frame.loc["old", "recovered"])
    assert pd.isna(frame.loc["old", "prompt"])
    assert frame.loc["new", "prompt"] == "a cat"
    assert frame.loc["new", "recovered"] == False  # noqa: E712 - a numpy bool


# --- parts, partitions and kill safety ------------------------------------------------------


def test_flush_rows_writes_parts_and_keeps_row_order(tmp_path: Path) -> None:
    store = Storage(tmp_path)
    w = writer(store, flush_rows=3)
    for index in range(7):
        w.append(image("run-a", index))
    assert len(w.parts) == 2  # 3 + 3 written, 1 pending
    w.close()
    assert len(w.parts) == 3
    assert len(set(w.parts)) == 3
    assert all(Path(part).is_file() for part in w.parts)
    assert [pq.read_metadata(part).num_rows for part in w.parts] == [3, 3, 1]

    frame = load_run_metadata(tmp_path, "images", prompt_set="s", backend="flux_schnell")
    assert frame["image_index"].tolist() == list(range(7))
    w.close()  # closing again writes nothing
    assert len(w.parts) == 3


def test_flush_every_n_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(run_metadata_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    w = writer(Storage(tmp_path), flush_seconds=5.0, flush_rows=1000)
    w.append(image("run-a", 0))
    now[0] = 104.0
    w.append(image("run-a", 1))
    assert w.parts == []
    now[0] = 105.0
    w.append(image("run-a", 2))
    assert len(w.parts) == 1
    now[0] = 109.0
    w.append(image("run-a", 3))
    assert len(w.parts) == 1  # 4 s since that flush
    now[0] = 110.0
    w.append(image("run-a", 4))
    assert [pq.read_metadata(part).num_rows for part in w.parts] == [3, 2]


def test_unclosed_writer_leaves_its_flushed_parts_readable(tmp_path: Path) -> None:
    store = Storage(tmp_path)
    w = writer(store, flush_rows=2)
    for index in range(5):
        w.append(image("run-a", index))
    # The process dies here: no close(), no flush of the fifth row.
    frame = load_run_metadata(tmp_path, "images")
    assert frame["image_index"].tolist() == [0, 1, 2, 3]
    assert not list((tmp_path / "run_metadata").rglob(".*.tmp"))


def test_partition_filters(tmp_path: Path) -> None:
    store = Storage(tmp_path)
    write(store, "r", "s", "flux_schnell", 1)
    write(store, "r", "s", "gemini", 2)
    write(store, "r", "t", "gemini", 3)
    assert len(load_run_metadata(store, "images")) == 6
    assert len(load_run_metadata(store, "images", prompt_set="s")) == 3
    assert len(load_run_metadata(store, "images", prompt_set="t", backend="gemini")) == 3
    assert len(load_run_metadata(store, "images", prompt_set="s", backend="gemini")) == 2
    assert load_run_metadata(store, "images", prompt_set="u").empty
    assert run_metadata_folder(store, "steps", "s", "gemini") == store.path(
        "run_metadata", "steps", "s", "gemini"
    )


def test_two_writers_at_once_never_collide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same run, partition and clock: only the writers' own part names can tell them apart.
    frozen = datetime(2025, 1, 1, tzinfo=UTC)
    monkeypatch.setattr(run_metadata_module, "utc_now", lambda: frozen)
    store = Storage(tmp_path)
    writers = [writer(store, run_id="same-run", flush_rows=1) for _ in range(2)]
    start = threading.Barrier(2)

    def fill(number: int) -> None:
        start.wait()
        for index in range(25):
            writers[number].append(image("same-run", 100 * number + index))
        writers[number].close()

    threads = [threading.Thread(target=fill, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert len(set(writers[0].parts) | set(writers[1].parts)) == 50
    frame = load_run_metadata(store, "images")
    assert sorted(frame["image_index"]) == [*range(25), *range(100, 125)]


def test_steps_table_round_trip(tmp_path: Path) -> None:
    store = Storage(tmp_path)
    record = StepRecord(
        run_id="r",
        asset="images",
        prompt_set="s",
        backend="sdxl_turbo",
        model_id=None,
        revision=None,
        device="cpu",
        worker="host:1",
        requested=4,
        generated=3,
        seconds=1.5,
    )
    write_records(store, "steps", [record], run_id="r", prompt_set="s", backend="sdxl_turbo")
    frame = load_run_metadata(store, "steps")
    assert frame.to_dict("records")[0]["requested"] == 4
    assert frame["model_id"].isna().all()
    assert frame["seconds"].tolist() == [1.5]
    assert load_run_metadata(store, "images").empty


def test_object_store_parts() -> None:
    store = Storage("memory://bucket/test-run-metadata")
    try:
        w = writer(store, flush_rows=2)
        for index in range(3):
            w.append(image("run-a", index))
        w.close()
        assert all(part.startswith("memory://") for part in w.parts)
        frame = load_run_metadata(store, "images", prompt_set="s")
        assert frame["image_index"].tolist() == [0, 1, 2]
    finally:
        store.base.fs.rm(store.base.path, recursive=True)
