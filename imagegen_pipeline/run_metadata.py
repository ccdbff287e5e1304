"""Run metadata in Parquet: one new file per step, never rewritten, one loader for all of it.

Layout: ``<base>/run_metadata/<table>/<timestamp>_<run>_<prompt set>_<backend>_<nonce>.parquet``.
Each table has one fixed Arrow schema, so every file of a table can be read as one dataset by
pandas, pyarrow, DuckDB (``read_parquet('.../images/*.parquet')``) or Polars alike, and two runs
that write at the same moment never lose each other's rows.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from imagegen_pipeline.atomic_files import write_parquet_atomic

_TIMESTAMP = pa.timestamp("us", tz="UTC")

IMAGES_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("prompt_set", pa.string()),
        ("backend", pa.string()),
        (
            "image_id",
            pa.string(),
        ),  # the content address (sha256 of everything that makes the image)
        ("prompt_id", pa.string()),
        ("image_index", pa.int32()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("model_id", pa.string()),
        ("revision", pa.string()),
        ("seed", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("steps", pa.int32()),
        ("guidance", pa.float64()),
        ("status", pa.string()),  # ok, failed, blocked, skipped_budget, skipped_existing
        ("error", pa.string()),
        ("path", pa.string()),
        ("sha256", pa.string()),
        ("seconds", pa.float64()),
        ("device", pa.string()),
        ("peak_gpu_memory_mb", pa.float64()),
        ("finish_reason", pa.string()),
        ("retries", pa.int32()),
        ("prompt_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
        ("cost_usd", pa.float64()),
        ("started_at", _TIMESTAMP),
        ("finished_at", _TIMESTAMP),
    ]
)

STEPS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("asset", pa.string()),
        ("prompt_set", pa.string()),
        ("backend", pa.string()),
        ("model_id", pa.string()),
        ("revision", pa.string()),
        ("device", pa.string()),
        ("requested", pa.int64()),
        ("generated", pa.int64()),
        ("skipped_existing", pa.int64()),
        ("failed", pa.int64()),
        ("blocked", pa.int64()),
        ("skipped_budget", pa.int64()),
        ("seconds", pa.float64()),
        ("items_per_second", pa.float64()),
        ("model_loads", pa.int64()),
        ("model_load_seconds", pa.float64()),
        ("peak_gpu_memory_mb", pa.float64()),
        ("cost_usd", pa.float64()),
        ("started_at", _TIMESTAMP),
        ("finished_at", _TIMESTAMP),
    ]
)

CLIPS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("prompt_set", pa.string()),
        ("backend", pa.string()),
        ("clip_id", pa.string()),  # content address of the clip
        ("source_image_id", pa.string()),
        ("source_path", pa.string()),
        ("prompt_id", pa.string()),
        ("image_index", pa.int32()),  # which image of the prompt the clip animates
        ("model_id", pa.string()),
        ("revision", pa.string()),
        ("seed", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("frames", pa.int32()),
        ("fps", pa.int32()),
        ("steps", pa.int32()),
        ("motion_bucket_id", pa.int32()),
        ("noise_aug_strength", pa.float64()),
        ("status", pa.string()),  # ok, failed, skipped_existing
        ("error", pa.string()),
        ("memory_fallback", pa.string()),  # what an out-of-memory retry took, if anything
        ("path", pa.string()),
        ("preview_path", pa.string()),
        ("sha256", pa.string()),
        ("seconds", pa.float64()),
        ("device", pa.string()),
        ("peak_gpu_memory_mb", pa.float64()),
        ("started_at", _TIMESTAMP),
        ("finished_at", _TIMESTAMP),
    ]
)

TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "images": IMAGES_SCHEMA,
    "steps": STEPS_SCHEMA,
    "clips": CLIPS_SCHEMA,
}


def utc_now() -> datetime:
    """The current time, timezone-aware, as stored in every timestamp column."""
    return datetime.now(UTC)


def run_metadata_dir(base_dir: Path, table: str) -> Path:
    """The folder that holds every file of one run-metadata table."""
    if table not in TABLE_SCHEMAS:
        raise ValueError(f"unknown run-metadata table {table!r}; known: {sorted(TABLE_SCHEMAS)}")
    return base_dir / "run_metadata" / table


def write_run_metadata(
    base_dir: Path,
    table: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    run_id: str,
    partition_label: str,
) -> Path | None:
    """Write ``rows`` to a new Parquet file of ``table``; returns its path (None for no rows)."""
    if not rows:
        return None
    schema = TABLE_SCHEMAS[table]
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    arrow_table = pa.Table.from_pydict(columns, schema=schema)
    stamp = utc_now().strftime("%Y%m%dT%H%M%S%fZ")
    safe_label = partition_label.replace("|", "_").replace("/", "_")
    file_name = f"{stamp}_{run_id[:8]}_{safe_label}_{secrets.token_hex(3)}.parquet"
    path = run_metadata_dir(base_dir, table) / file_name
    write_parquet_atomic(path, arrow_table)
    return path


def load_run_metadata(base_dir: str | Path, table: str = "images") -> pd.DataFrame:
    """Every row ever written to ``table`` under ``base_dir`` as one pandas DataFrame."""
    folder = run_metadata_dir(Path(base_dir), table)
    schema = TABLE_SCHEMAS[table]
    files = sorted(folder.glob("*.parquet")) if folder.exists() else []
    if not files:
        return schema.empty_table().to_pandas()
    # An explicit schema makes files written before a column existed read back with nulls.
    return (
        ds.dataset([str(f) for f in files], schema=schema, format="parquet").to_table().to_pandas()
    )


def write_step_metadata(
    base_dir: Path,
    table: str,
    rows: Sequence[Mapping[str, Any]],
    step_row: Mapping[str, Any],
    *,
    run_id: str,
    prompt_set: str,
    backend: str,
) -> tuple[Path | None, Path | None]:
    """Write one step's item rows to ``table`` and its summary row to ``steps``."""
    label = f"{prompt_set}_{backend}"
    items = write_run_metadata(base_dir, table, rows, run_id=run_id, partition_label=label)
    steps = write_run_metadata(base_dir, "steps", [step_row], run_id=run_id, partition_label=label)
    return items, steps
