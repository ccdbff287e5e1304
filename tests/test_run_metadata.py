"""Run metadata: new files per run, one loader, readable by pandas, pyarrow, DuckDB and Polars."""

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest

from imagegen_pipeline.run_metadata import (
    IMAGES_SCHEMA,
    load_run_metadata,
    run_metadata_dir,
    utc_now,
    write_run_metadata,
)


def rows(run_id: str, count: int) -> list[dict]:
    common = {"run_id": run_id, "prompt_set": "s", "backend": "flux_schnell", "status": "ok"}
    return [
        {**common, "image_id": f"{run_id}-{i}", "seed": i, "seconds": 0.5, "started_at": utc_now()}
        for i in range(count)
    ]


def test_two_runs_keep_each_others_rows(tmp_path):
    first = write_run_metadata(
        tmp_path, "images", rows("run-a", 2), run_id="run-a", partition_label="s|f"
    )
    second = write_run_metadata(
        tmp_path, "images", rows("run-b", 3), run_id="run-b", partition_label="s|f"
    )
    assert first != second and first.exists() and second.exists()

    frame = load_run_metadata(tmp_path, "images")
    assert sorted(frame["run_id"].value_counts().items()) == [("run-a", 2), ("run-b", 3)]
    assert list(frame.columns) == IMAGES_SCHEMA.names
    assert frame["cost_usd"].isna().all()


def test_every_reader_sees_the_same_rows(tmp_path):
    for run_id in ("r1", "r2"):
        write_run_metadata(tmp_path, "images", rows(run_id, 2), run_id=run_id, partition_label="x")
    glob = str(run_metadata_dir(tmp_path, "images") / "*.parquet")

    assert pq.ParquetDataset(str(run_metadata_dir(tmp_path, "images"))).read().num_rows == 4
    query = f"select count(*), sum(seed) from read_parquet('{glob}')"
    assert duckdb.sql(query).fetchall() == [(4, 2)]
    assert pl.read_parquet(glob).height == 4
    assert len(load_run_metadata(tmp_path)) == 4


def test_empty_and_unknown_tables(tmp_path):
    assert load_run_metadata(tmp_path, "steps").empty
    assert write_run_metadata(tmp_path, "images", [], run_id="r", partition_label="x") is None
    with pytest.raises(ValueError, match="unknown run-metadata table"):
        load_run_metadata(tmp_path, "nope")
