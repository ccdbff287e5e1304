"""Per-partition metadata of a step over many sets: each partition gets its own, and recording it
does not list the run's range again (Dagster's own call did, once per call: N^2 over N sets)."""

import dagster as dg
import pytest
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from imagegen_pipeline.defs.metadata import add_partition_metadata
from imagegen_pipeline.defs.partitions import prompt_set_partitions, prompt_set_x_backend_partitions

SETS = ["alpha", "beta", "gamma"]


def _key(prompt_set: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"prompt_set": prompt_set, "backend": "flux_schnell"})


def test_each_partition_gets_its_metadata_without_listing_the_range_again(monkeypatch):
    listings = []
    listing = dg.MultiPartitionsDefinition.get_partition_keys_in_range

    def counted(self, *args, **kwargs):
        listings.append(1)
        return listing(self, *args, **kwargs)

    monkeypatch.setattr(dg.MultiPartitionsDefinition, "get_partition_keys_in_range", counted)

    @dg.asset(partitions_def=prompt_set_x_backend_partitions)
    def per_set(context: dg.AssetExecutionContext) -> None:
        keys = context.partition_keys
        before = len(listings)
        for number, key in enumerate(keys):
            add_partition_metadata(context, {"number": number, "set": key}, partition_key=key)
        assert len(listings) == before  # no listing per call
        with pytest.raises(dg.DagsterInvariantViolationError, match="not made by this step"):
            add_partition_metadata(context, {}, partition_key=keys[0], asset_key="other")

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(prompt_set_partitions.name, SETS)
        tags = {
            ASSET_PARTITION_RANGE_START_TAG: _key(SETS[0]),
            ASSET_PARTITION_RANGE_END_TAG: _key(SETS[-1]),
        }
        assert dg.materialize([per_set], instance=instance, tags=tags).success
        records = instance.fetch_materializations(dg.AssetKey("per_set"), limit=10).records
        metadata = {r.partition_key: r.asset_materialization.metadata for r in records}
        assert sorted(metadata) == sorted(_key(s) for s in SETS)
        for number, prompt_set in enumerate(SETS):
            assert metadata[_key(prompt_set)]["number"].value == number
            assert metadata[_key(prompt_set)]["set"].value == _key(prompt_set)


def test_a_markdown_table_keeps_its_rows_and_columns_whatever_the_cells_hold():
    import pandas as pd

    from imagegen_pipeline.defs.metadata import markdown_table

    frame = pd.DataFrame(
        {"prompt": ["a | b", "two\nlines", "c"], "score": [0.123456789, float("nan"), 2.0]}
    )
    text = markdown_table(frame, ["prompt", "missing", "score"], rows=2).value
    assert text.splitlines() == [
        "| prompt | score |",
        "|---|---|",
        "| a \\| b | 0.123457 |",
        "| two lines |  |",
    ]
    assert markdown_table(frame.head(0), ["prompt"]).value == "_no rows_"
