"""Where prompt CSVs are read from and where every output lands."""

from pathlib import Path

import dagster as dg
import pandas as pd

from imagegen_pipeline.atomic_files import write_parquet_atomic


class StorageResource(dg.ConfigurableResource):
    """The prompts folder and the one base folder under which all outputs land."""

    prompts_dir: str = "prompts"  # the folder users drop prompt CSVs into
    base_dir: str = "storage"  # images, clips, reports, tables and run metadata go under here

    @property
    def base(self) -> Path:
        """The output base folder."""
        return Path(self.base_dir)

    def images_dir(self, prompt_set: str, backend: str) -> Path:
        """The folder of one partition's PNGs."""
        return self.base / "images" / prompt_set / backend

    def table_path(self, asset: str, *partition: str) -> Path:
        """The Parquet file an asset's partition is stored in."""
        return self.base / "tables" / asset / Path(*partition).with_suffix(".parquet")


class ParquetIOManager(dg.ConfigurableIOManager):
    """Stores DataFrame assets as one Parquet file per partition under the storage folder."""

    storage: dg.ResourceDependency[StorageResource]

    def _path(self, context: dg.OutputContext | dg.InputContext) -> Path:
        asset = context.asset_key.path[-1]
        if not context.has_asset_partitions:
            return self.storage.table_path(asset, "all")
        key = context.asset_partition_key
        if isinstance(key, dg.MultiPartitionKey):
            parts = key.keys_by_dimension
            return self.storage.table_path(asset, parts["prompt_set"], parts["backend"])
        return self.storage.table_path(asset, key)

    def handle_output(self, context: dg.OutputContext, obj: pd.DataFrame) -> None:
        path = self._path(context)
        write_parquet_atomic(path, obj)
        context.add_output_metadata({"parquet": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext) -> pd.DataFrame:
        path = self._path(context)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: materialize {context.asset_key.to_user_string()} "
                f"for partition {context.asset_partition_key} first"
            )
        return pd.read_parquet(path)
