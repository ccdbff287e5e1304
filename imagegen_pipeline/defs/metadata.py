"""Asset metadata: recorded per partition (Markdown tables and thumbnail previews the Dagster UI
shows), and read back by the sensors."""

import base64
import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import dagster as dg
import pandas as pd
from PIL import Image

from imagegen_pipeline.image_files import DECODE_ERRORS


def add_partition_metadata(
    context: dg.AssetExecutionContext,
    metadata: Mapping[str, Any],
    *,
    partition_key: str,
    asset_key: str | None = None,
) -> None:
    """``context.add_asset_metadata`` for one of ``context.partition_keys``, in constant time.

    Dagster checks every call's partition against the run's range by listing the range again,
    with its own queries of the dynamic partitions: a step over N sets paid N^2 (16 s of a
    200-set run). The keys our steps loop over come from the range, so the metadata goes
    straight where Dagster's own call puts it; if that place moves in a Dagster release, the
    public call (slow, same result) takes over and tests/defs/test_metadata.py says so.
    """
    step = getattr(context.op_execution_context, "_step_execution_context", None)
    accumulator = getattr(step, "_metadata_accumulator", None)
    if accumulator is None:
        context.add_asset_metadata(metadata, asset_key=asset_key, partition_key=partition_key)
        return
    key = dg.AssetKey.from_coercible(asset_key) if asset_key else context.assets_def.key
    if key not in context.assets_def.keys:
        raise dg.DagsterInvariantViolationError(f"{key.to_user_string()} is not made by this step")
    step._metadata_accumulator = accumulator.with_additional_asset_metadata(  # type: ignore[union-attr]
        asset_key=key, metadata=metadata, partition_key=partition_key
    )


def latest_materialization(
    instance: dg.DagsterInstance, key: dg.AssetKey, partition: str
) -> dg.EventLogRecord | None:
    """The newest materialization of one partition of an asset, or None."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
    ).records
    return records[0] if records else None


def markdown_table(frame: pd.DataFrame, columns: Sequence[str], rows: int = 10) -> dg.MetadataValue:
    """The first ``rows`` rows of ``frame`` as a Markdown table."""
    head = frame.loc[:, [c for c in columns if c in frame.columns]].head(rows)
    if not len(head):
        return dg.MetadataValue.md("_no rows_")
    # Written out rather than DataFrame.to_markdown: tabulate's column fitting took 3 ms a
    # table, and a run over 200 sets draws thousands; the UI renders and aligns them anyway.
    lines = [_markdown_row(head.columns), "|" + "---|" * len(head.columns)]
    lines += [_markdown_row(values) for values in head.itertuples(index=False)]
    return dg.MetadataValue.md("\n".join(lines))


def _markdown_row(cells: Iterable[Any]) -> str:
    return "| " + " | ".join(_markdown_cell(cell) for cell in cells) + " |"


def _markdown_cell(cell: Any) -> str:
    if pd.isna(cell) is True:  # None, NaN, NA, NaT (a list cell gives an array)
        return ""
    text = format(cell, ".6g") if isinstance(cell, float) else str(cell)
    return text.replace("|", "\\|").replace("\n", " ")


def thumbnails(
    paths: Sequence[str],
    read_bytes: Callable[[str], bytes],
    limit: int = 6,
    size: int = 128,
) -> dg.MetadataValue:
    """Up to ``limit`` images inlined as small JPEG data URIs, so the UI shows them.

    A file that cannot be read or decoded gets a line saying why instead of its thumbnail:
    metadata never fails a step."""
    cells = []
    for path in list(paths)[:limit]:
        name = str(path).rsplit("/", 1)[-1]
        try:
            with Image.open(io.BytesIO(read_bytes(path))) as image:
                image = image.convert("RGB")
                image.thumbnail((size, size))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=80)
        except DECODE_ERRORS as error:
            cells.append(f"_{name} unreadable ({type(error).__name__}: {error})_")
            continue
        encoded = base64.b64encode(buffer.getvalue()).decode()
        cells.append(f"![{name}](data:image/jpeg;base64,{encoded})")
    return dg.MetadataValue.md(" ".join(cells) if cells else "_no images_")
