"""Asset tables read by several steps of one run are decoded once, and never served stale."""

import pandas as pd

from imagegen_pipeline.defs.storage import ParquetTables
from imagegen_pipeline.run_metadata import parquet_bytes
from imagegen_pipeline.storage import Storage


def _bytes(frame: pd.DataFrame) -> bytes:
    import pyarrow as pa

    return parquet_bytes(pa.Table.from_pandas(frame, preserve_index=False))


def test_a_table_is_read_once_until_its_file_is_rewritten(tmp_path):
    storage = Storage(tmp_path)
    tables = ParquetTables(storage, storage.path("tables"))
    path = storage.path("tables", "enhanced_prompts", "alpha.parquet")
    storage.write_bytes(path, _bytes(pd.DataFrame({"prompt": ["a cat", "a dog"]})))
    reads = []
    read_bytes = storage.read_bytes
    storage.read_bytes = lambda target: reads.append(target) or read_bytes(target)

    first = tables.load_from_path(None, path)
    first.loc[0, "prompt"] = "changed by its caller"
    second = tables.load_from_path(None, path)
    assert len(reads) == 1
    assert list(second["prompt"]) == ["a cat", "a dog"]  # each caller gets its own copy

    # Rewritten with the same size (as fast as a step can): read again.
    storage.write_bytes(path, _bytes(pd.DataFrame({"prompt": ["a cow", "a dog"]})))
    assert list(tables.load_from_path(None, path)["prompt"]) == ["a cow", "a dog"]
    assert len(reads) == 2


def test_the_tables_kept_are_bounded(tmp_path, monkeypatch):
    storage = Storage(tmp_path)
    tables = ParquetTables(storage, storage.path("tables"))
    monkeypatch.setattr(ParquetTables, "max_kept_rows", 5)
    paths = [storage.path("tables", "t", f"{i}.parquet") for i in range(4)]
    for path in paths:
        storage.write_bytes(path, _bytes(pd.DataFrame({"n": [1, 2]})))
        tables.load_from_path(None, path)
    assert len(tables._read) == 2 and tables._kept_rows == 4  # the oldest left first
    assert list(tables._read) == [p.path for p in paths[2:]]
