"""Records: one dataclass per table, its Arrow schema derived from the fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Optional

import pyarrow as pa
import pytest

from imagegen_pipeline.records import (
    RECORD_TYPES,
    TABLE_SCHEMAS,
    BatchJobRecord,
    ImageRecord,
    StepRecord,
    VideoClipRecord,
    arrow_schema,
    to_arrow,
    utc_now,
)

TIMESTAMP = pa.timestamp("us", tz="UTC")


@dataclass
class EveryType:
    text: str
    count: int
    ratio: float
    flag: bool
    when: datetime
    maybe_text: str | None = None
    maybe_count: Optional[int] = None  # noqa: UP045 - the old spelling must map too
    maybe_ratio: None | float = None  # noqa: RUF036 - and None first
    maybe_flag: bool | None = None
    maybe_when: datetime | None = None


@dataclass
class Unsupported:
    tags: list[str]


def test_schema_maps_every_field_to_its_arrow_type() -> None:
    assert arrow_schema(EveryType) == pa.schema(
        [
            ("text", pa.string()),
            ("count", pa.int64()),
            ("ratio", pa.float64()),
            ("flag", pa.bool_()),
            ("when", TIMESTAMP),
            ("maybe_text", pa.string()),
            ("maybe_count", pa.int64()),
            ("maybe_ratio", pa.float64()),
            ("maybe_flag", pa.bool_()),
            ("maybe_when", TIMESTAMP),
        ]
    )
    assert all(field.nullable for field in arrow_schema(EveryType))


def test_unsupported_field_type_is_an_error() -> None:
    with pytest.raises(KeyError):
        arrow_schema(Unsupported)


@pytest.mark.parametrize("table", ["images", "clips", "steps"])
def test_table_schema_names_are_the_dataclass_fields_in_order(table: str) -> None:
    fields = [f.name for f in dataclasses.fields(RECORD_TYPES[table])]
    assert TABLE_SCHEMAS[table].names == fields
    assert len(set(fields)) == len(fields)


def test_record_types_per_table() -> None:
    expected = {
        "images": ImageRecord,
        "clips": VideoClipRecord,
        "steps": StepRecord,
        "batch_jobs": BatchJobRecord,  # Gemini batch jobs (tests/backends/test_gemini_batch.py)
    }
    assert expected == RECORD_TYPES
    assert set(TABLE_SCHEMAS) == set(RECORD_TYPES)


@pytest.mark.parametrize(
    ("table", "column", "arrow_type"),
    [
        ("images", "run_id", pa.string()),
        ("images", "seed", pa.int64()),
        ("images", "guidance", pa.float64()),
        ("images", "path", pa.string()),
        ("images", "cost_usd", pa.float64()),
        ("images", "recovered", pa.bool_()),
        ("images", "started_at", TIMESTAMP),
        ("clips", "frames", pa.int64()),
        ("clips", "noise_aug_strength", pa.float64()),
        ("clips", "memory_fallback", pa.string()),
        ("steps", "model_id", pa.string()),
        ("steps", "items_per_second", pa.float64()),
        ("steps", "model_cache_hits", pa.int64()),
        ("steps", "finished_at", TIMESTAMP),
    ],
)
def test_known_columns(table: str, column: str, arrow_type: pa.DataType) -> None:
    assert TABLE_SCHEMAS[table].field(column).type == arrow_type


def step(**values: object) -> StepRecord:
    base = {
        "run_id": "r",
        "asset": "images",
        "prompt_set": "s",
        "backend": "flux_schnell",
        "model_id": None,
        "revision": "main",
        "device": "cpu",
        "worker": "host:1",
    }
    return StepRecord(**(base | values))  # type: ignore[arg-type]


def test_to_arrow_keeps_values_and_nulls() -> None:
    paris = timezone(timedelta(hours=1))
    started = datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=paris)
    table = to_arrow([step(requested=3, seconds=2.5, started_at=started), step()], "steps")

    assert table.schema == TABLE_SCHEMAS["steps"]
    assert table.num_rows == 2
    rows = table.to_pylist()
    assert rows[0]["requested"] == 3
    assert rows[0]["seconds"] == 2.5
    assert rows[0]["model_id"] is None
    assert rows[1]["started_at"] is None
    # Stored in UTC, the same instant.
    assert rows[0]["started_at"] == started
    assert rows[0]["started_at"].utcoffset() == timedelta(0)
    assert to_arrow([], "images").schema == TABLE_SCHEMAS["images"]


def test_to_arrow_rejects_a_wrong_value_type() -> None:
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        to_arrow([step(requested="three")], "steps")


def test_utc_now_is_timezone_aware() -> None:
    now = utc_now()
    assert now.tzinfo is not None
    assert now.utcoffset() == timedelta(0)
    assert abs(now - datetime.now(UTC)) < timedelta(seconds=5)
