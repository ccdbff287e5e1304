"""Where prompt CSVs are read from, where every output lands, and the IO managers over it.

Asset tables go through Dagster's ``UPathIOManager``: one Parquet file per partition under
``<storage>/tables/<asset>/``, on a local folder or any fsspec URL alike, fan-in of several
partitions as a dict. Two things are added to it: writes go through the project's atomic
``Storage``, and a run that covers several partitions (a single-run backfill) hands over and
gets back one table per partition key, always as a dict, so asset code has one shape to handle.
"""

import io
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import pandas as pd
from upath import UPath

from imagegen_pipeline.image_files import DEFAULT_PNG_COMPRESS_LEVEL
from imagegen_pipeline.project_config import load_project_config
from imagegen_pipeline.run_metadata import parquet_bytes
from imagegen_pipeline.steps.skeleton import DEFAULT_WRITER_THREADS
from imagegen_pipeline.storage import Storage


class StorageResource(dg.ConfigurableResource):
    """The prompts folder, the base path of every output, and how outputs are written."""

    base: str = ""  # a folder or URL (s3://bucket/prefix); "" = imagegen.toml / IMAGEGEN_STORAGE
    prompts_dir: str = ""  # the folder users drop CSVs into; "" = the project's (prompts/)
    png_compress_level: int = DEFAULT_PNG_COMPRESS_LEVEL  # zlib 0-9: 1 is fast, 9 small
    writer_threads: int = DEFAULT_WRITER_THREADS  # threads encoding outputs while the model works
    # What a step checks of an output it finds before skipping it: "size" (its size against its
    # row, and that it decodes) or "hash" (its sha256 too, which reads every byte).
    verify: Literal["size", "hash"] = "size"

    def storage(self) -> Storage:
        """The output store."""
        return Storage(self.base or load_project_config().storage)

    def prompts_folder(self) -> Path:
        """The folder of prompt CSVs."""
        return Path(self.prompts_dir or load_project_config().prompts_dir)


class StoredFiles(dg.UPathIOManager):
    """A UPathIOManager whose files go through the project's atomic ``Storage``."""

    def __init__(self, storage: Storage, base_path: UPath) -> None:
        super().__init__(base_path=base_path)
        self.storage = storage


class ParquetTables(StoredFiles):
    """DataFrames as Parquet files, written atomically, one per partition.

    On a local disk a table read once is kept, keyed by its file's inode, size and modification
    time (writes are atomic renames: a rewritten file is a new inode), so the steps of one run
    that read the same table (four assets read the enhanced prompts of every set) decode it
    once.
    """

    extension = ".parquet"
    max_kept_rows = 1_000_000  # about a few hundred MB of tables at most

    def __init__(self, storage: Storage, base_path: UPath) -> None:
        super().__init__(storage, base_path)
        self._read: OrderedDict[str, tuple[tuple[int, int, int], pd.DataFrame]] = OrderedDict()
        self._kept_rows = 0

    def dump_to_path(self, context: dg.OutputContext, obj: pd.DataFrame, path: UPath) -> None:
        self.storage.write_bytes(path, parquet_bytes(_arrow(obj)))

    def load_from_path(self, context: dg.InputContext, path: UPath) -> pd.DataFrame:
        if not self.storage.is_local:
            return pd.read_parquet(io.BytesIO(self.storage.read_bytes(path)))
        stat = Path(path.path).stat()
        identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        kept = self._read.pop(path.path, None)
        if kept is not None:
            self._kept_rows -= len(kept[1])
        if kept is None or kept[0] != identity:
            kept = (identity, pd.read_parquet(io.BytesIO(self.storage.read_bytes(path))))
        self._read[path.path] = kept
        self._kept_rows += len(kept[1])
        while self._kept_rows > self.max_kept_rows and len(self._read) > 1:
            self._kept_rows -= len(self._read.popitem(last=False)[1][1])
        return kept[1].copy()  # callers may change theirs

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if not context.has_asset_partitions or len(context.asset_partition_keys) == 1:
            if isinstance(obj, dict) and context.has_asset_partitions:
                (obj,) = obj.values()
            super().handle_output(context, obj)
            return
        # A single run over several partitions: one table per partition key.
        paths = self._get_paths_for_partitions(context)
        missing = sorted(set(paths) - set(obj))
        if missing:
            raise dg.Failure(f"{context.asset_key.to_user_string()}: no table for {missing}")
        for key, path in paths.items():
            self.make_directory(path.parent)
            self.dump_to_path(context, obj[key], path)

    def load_partitions(self, context: dg.InputContext) -> dict[str, pd.DataFrame]:
        # Dagster's own loop logs one line per partition, and every line is an event-log write
        # (~10 ms on SQLite): a run over hundreds of partitions paid seconds for them, inside
        # the GPU steps. One line for the whole fan-in instead.
        paths = self._get_paths_for_partitions(context)
        metadata = context.definition_metadata or {}
        allow_missing = bool(metadata.get("allow_missing_partitions", False))
        tables: dict[str, pd.DataFrame] = {}
        for key, path in paths.items():
            try:
                tables[key] = self.load_from_path(context, path)
            except FileNotFoundError:
                if not allow_missing:  # else left out; the asset says which set it lacks
                    raise
        asset = context.asset_key.to_user_string()
        context.log.debug(
            f"Loaded {len(tables)} of {len(paths)} {asset} table(s) from {self._base_path}."
        )
        return tables


def _arrow(frame: pd.DataFrame) -> Any:
    import pyarrow as pa

    return pa.Table.from_pandas(frame, preserve_index=False)


class TableIOManager(dg.ConfigurableIOManagerFactory):
    """Asset tables as Parquet under <storage>/tables, one file per partition."""

    storage: dg.ResourceDependency[StorageResource]

    def create_io_manager(self, context: dg.InitResourceContext) -> ParquetTables:
        store = self.storage.storage()
        return ParquetTables(store, store.path("tables"))


class PickledStepOutputs(StoredFiles):
    """Outputs passed between the ops of one graph-backed asset, pickled under <storage>/steps."""

    extension = ".pickle"

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path: UPath) -> None:
        self.storage.write_bytes(path, pickle.dumps(obj))

    def load_from_path(self, context: dg.InputContext, path: UPath) -> Any:
        return pickle.loads(self.storage.read_bytes(path))


class StepOutputIOManager(dg.ConfigurableIOManagerFactory):
    """Intermediate outputs of graph-backed assets, under <storage>/steps/<run id>."""

    storage: dg.ResourceDependency[StorageResource]

    def create_io_manager(self, context: dg.InitResourceContext) -> PickledStepOutputs:
        store = self.storage.storage()
        return PickledStepOutputs(store, store.path("steps"))


def stored_table(
    storage: Storage, asset: str, prompt_set: str, backend: str
) -> pd.DataFrame | None:
    """The last stored table of one prompt set x backend partition of ``asset``, if any.

    The path follows ``UPathIOManager``'s layout for multi-partition keys: the dimension values
    in the order of the dimension names (backend, then prompt set)."""
    path = storage.path("tables", asset, backend, f"{prompt_set}{ParquetTables.extension}")
    try:
        return pd.read_parquet(io.BytesIO(storage.read_bytes(path)))
    except FileNotFoundError:
        return None
