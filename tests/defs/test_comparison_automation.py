"""The comparison refreshes by itself once a backend's reports of its prompt set change."""

import dagster as dg

from imagegen_pipeline.definitions import defs
from imagegen_pipeline.local_runner import materialize_prompt_sets


def test_comparison_is_requested_after_a_backend_finishes(dagster_instance, make_resources):
    resources = make_resources()
    materialize_prompt_sets(
        defs, ["example"], ["sdxl_turbo"], instance=dagster_instance, resources=resources
    )
    comparison = dg.AssetKey("backend_comparison")
    # The demo materialized the comparison too: nothing has changed since, nothing to do.
    first = dg.evaluate_automation_conditions(defs=defs, instance=dagster_instance)
    assert first.get_requested_partitions(comparison) == set()

    # Another backend's reports of the set arrive: the comparison of that set is requested,
    # although the gemini partitions were never materialized.
    key = dg.MultiPartitionKey({"prompt_set": "example", "backend": "flux_schnell"})
    assets = [*defs.assets, *(defs.asset_checks or [])]
    dg.materialize(
        assets,
        selection=dg.AssetSelection.groups("images", "clips", "quality", "keepers"),
        partition_key=key,
        instance=dagster_instance,
        resources=resources,
    )
    second = dg.evaluate_automation_conditions(
        defs=defs, instance=dagster_instance, cursor=first.cursor
    )
    assert second.get_requested_partitions(comparison) == {"example"}
