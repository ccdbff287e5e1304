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


def test_a_set_with_reports_but_no_comparison_is_drawn_whatever_the_trigger_saw(
    dagster_instance, make_resources
):
    # Reports made while no automation tick was watching (the daemon stopped; here, before the
    # first evaluation, which sees no update by definition) and no comparison drawn from them.
    materialize_prompt_sets(
        defs, ["example"], ["sdxl_turbo"], instance=dagster_instance, resources=make_resources()
    )
    comparison = dg.AssetKey("backend_comparison")
    dagster_instance.wipe_assets([comparison])
    first = dg.evaluate_automation_conditions(defs=defs, instance=dagster_instance)
    assert first.get_requested_partitions(comparison) == {"example"}

    # The daemon creates the run it asked for on the same tick: while that run is queued or
    # running, the set is not asked for again.
    run = dagster_instance.create_run_for_job(
        defs.resolve_job_def("compare_backends"), tags={"dagster/partition": "example"}
    )
    second = dg.evaluate_automation_conditions(
        defs=defs, instance=dagster_instance, cursor=first.cursor
    )
    assert second.get_requested_partitions(comparison) == set()

    # That run fails: no run after run failing the same way; the set's next update retries.
    dagster_instance.report_run_failed(run)
    third = dg.evaluate_automation_conditions(
        defs=defs, instance=dagster_instance, cursor=second.cursor
    )
    assert third.get_requested_partitions(comparison) == set()
