"""Atomic file writes: a reader (or a re-run after a kill) sees the whole file or no file.

Every output goes to a hidden temporary file in the destination folder, is flushed to disk and
then renamed over the final name. A rename within one filesystem is atomic on POSIX, so a run
killed at any point leaves at worst a ``.*.tmp`` file, which the next run sweeps away.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, PngImagePlugin

TEMP_SUFFIX = ".tmp"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    temp_path = Path(temp_name)
    try:
        yield temp_path
        with open(temp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp_path, path)
    finally:
        temp_path.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as temp_path:
        temp_path.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def encode_png(image: Image.Image, text_chunks: Mapping[str, str]) -> bytes:
    """PNG bytes of ``image`` with ``text_chunks`` embedded as tEXt/iTXt chunks."""
    info = PngImagePlugin.PngInfo()
    for key, value in text_chunks.items():
        info.add_itxt(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_parquet_atomic(
    path: Path, table: pd.DataFrame | pa.Table, schema: pa.Schema | None = None
) -> None:
    """Write a DataFrame or Arrow table as Parquet, atomically."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, schema=schema, preserve_index=False)
    with atomic_path(path) as temp_path:
        pq.write_table(table, temp_path)


def sweep_temp_files(folder: Path) -> int:
    """Delete temporary files a killed run left under ``folder``; returns how many."""
    if not folder.exists():
        return 0
    swept = 0
    for temp_path in folder.rglob(f".*{TEMP_SUFFIX}"):
        temp_path.unlink(missing_ok=True)
        swept += 1
    return swept
