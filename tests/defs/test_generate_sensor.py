"""The sensor that follows enhanced prompts, and the bulk schedule, as Dagster evaluates them."""

from datetime import UTC, datetime

import dagster as dg

from imagegen_pipeline.definitions import defs
from imagegen_pipeline.defs.images.sensors import (
    FINAL_ASSET,
    bulk_generation_schedule,
    generate_after_prompts_sensor,
)
from imagegen_pipeline.defs.partitions import partition_key, prompt_set_x_backend_partitions
from tests.conftest import SECOND_CSV

LOCAL = ("flux_schnell", "sdxl_turbo")
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


def spans(requests: list[dg.RunRequest]) -> list[str]:
    return sorted(
        r.partition_key or f"{r.tags[RANGE_START]}..{r.tags[RANGE_END]}" for r in requests
    )


def prepare(instance, resources, prompt_sets):
    assets = [*defs.assets, *(defs.asset_checks or [])]
    instance.add_dynamic_partitions("prompt_sets", prompt_sets)
    for prompt_set in prompt_sets:
        dg.materialize(
            assets,
            selection=dg.AssetSelection.groups("prompts"),
            partition_key=prompt_set,
            instance=instance,
            resources=resources,
        )


def test_every_set_enhanced_since_the_cursor_is_generated_in_one_run_per_backend(
    dagster_instance, make_resources, prompts_dir, monkeypatch
):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    (prompts_dir / "second.csv").write_text(SECOND_CSV)
    (prompts_dir / "third.csv").write_text(SECOND_CSV.replace("ramen", "noodles"))
    resources = make_resources()
    prepare(dagster_instance, resources, ["example"])
    first = generate_after_prompts_sensor(dg.build_sensor_context(instance=dagster_instance))
    assert spans(first.run_requests) == ["flux_schnell|example", "sdxl_turbo|example"]

    # Two sets land before the next tick: both are requested, together, once per backend.
    prepare(dagster_instance, resources, ["second", "third"])
    context = dg.build_sensor_context(instance=dagster_instance, cursor=first.cursor)
    second = generate_after_prompts_sensor(context)
    assert spans(second.run_requests) == [
        "flux_schnell|second..flux_schnell|third",
        "sdxl_turbo|second..sdxl_turbo|third",
    ]
    # Nothing new since: nothing requested.
    context = dg.build_sensor_context(instance=dagster_instance, cursor=second.cursor)
    idle = generate_after_prompts_sensor(context)
    assert not idle.run_requests and "No prompt set enhanced" in str(idle.skip_reason)


def test_generation_waits_while_prompt_sets_are_being_prepared(
    dagster_instance, make_resources, monkeypatch
):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    prepare(dagster_instance, make_resources(), ["example"])
    # Another CSV dropped at the same time is still being prepared.
    dagster_instance.add_run(
        dg.DagsterRun(
            job_name="prepare_prompts", run_id="f" * 36, status=dg.DagsterRunStatus.STARTED
        )
    )
    waiting = generate_after_prompts_sensor(dg.build_sensor_context(instance=dagster_instance))
    assert not waiting.run_requests and "being prepared" in str(waiting.skip_reason)
    assert waiting.cursor is None  # nothing consumed: the next tick sees "example" again

    dagster_instance.report_run_failed(dagster_instance.get_run_by_id("f" * 36))
    ready = generate_after_prompts_sensor(dg.build_sensor_context(instance=dagster_instance))
    assert spans(ready.run_requests) == ["flux_schnell|example", "sdxl_turbo|example"]


def test_a_set_a_run_has_finished_since_its_prompts_were_enhanced_is_left_alone(
    dagster_instance, make_resources, prompts_dir, monkeypatch
):
    """`make demo`, then `make ui`: the sensor's first tick sees the demo's enhanced prompts,
    and the demo's runs have finished them: nothing to ask for. A set enhanced again after
    those runs (its CSV edited) is generated."""
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    (prompts_dir / "second.csv").write_text(SECOND_CSV)
    resources = make_resources()
    prepare(dagster_instance, resources, ["example", "second"])

    @dg.asset(name=FINAL_ASSET.path[-1], partitions_def=prompt_set_x_backend_partitions)
    def final_asset_of_a_real_run() -> None:
        """A run that materializes the last asset of a partition, as the demo's runs do."""

    demo_run = dg.materialize(
        [final_asset_of_a_real_run],
        partition_key=str(partition_key("example", "flux_schnell")),
        instance=dagster_instance,
    )
    assert demo_run.success
    first = generate_after_prompts_sensor(dg.build_sensor_context(instance=dagster_instance))
    assert spans(first.run_requests) == [
        "flux_schnell|second",
        "sdxl_turbo|example..sdxl_turbo|second",
    ]
    prepare(dagster_instance, resources, ["example"])  # enhanced again, after the demo's run
    context = dg.build_sensor_context(instance=dagster_instance, cursor=first.cursor)
    again = generate_after_prompts_sensor(context)
    assert spans(again.run_requests) == ["flux_schnell|example", "sdxl_turbo|example"]


def finished(instance: dg.DagsterInstance, prompt_sets: list[str]) -> None:
    """What a complete pipeline leaves behind for the schedule: the last asset of every local
    backend's partition materialized (the user flows make them for real)."""
    for prompt_set in prompt_sets:
        for backend in LOCAL:
            instance.report_runless_asset_event(
                dg.AssetMaterialization(
                    FINAL_ASSET, partition=str(partition_key(prompt_set, backend))
                )
            )


def test_the_bulk_schedule_asks_for_missing_sets_once_per_backend(
    dagster_instance, make_resources, prompts_dir, monkeypatch
):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    for name in ("b", "c", "d"):
        (prompts_dir / f"{name}.csv").write_text(SECOND_CSV.replace("ramen", name))
    # "example" and "c" are complete for both backends; b and d only prepared.
    prepare(dagster_instance, make_resources(), ["example", "b", "c", "d"])
    finished(dagster_instance, ["example", "c"])

    # The daemon always passes the tick's time; it keys the runs (one run per tick).
    tick = datetime(2026, 11, 22, 2, 0, tzinfo=UTC)
    # A schedule context opens its own instance from the ref: closed with the context, else
    # its clean-up runs at garbage collection, in some later test, and resets Dagster's
    # current defs-state storage to a dead instance's.
    with dg.build_schedule_context(
        instance=dagster_instance, scheduled_execution_time=tick
    ) as context:
        requests = bulk_generation_schedule(context)
    assert all(r.run_key.startswith("bulk:2026-11-22T02:00:00") for r in requests)
    # One run per backend spanning b..d: c, in between, is already done and costs a listing.
    assert spans(requests) == ["flux_schnell|b..flux_schnell|d", "sdxl_turbo|b..sdxl_turbo|d"]
    assert {r.tags["imagegen/prompt_sets"] for r in requests} == {"b,d"}
    assert all(r.job_name in (None, "generate_images") for r in requests)

    finished(dagster_instance, ["b", "d"])
    with dg.build_schedule_context(
        instance=dagster_instance, scheduled_execution_time=tick
    ) as context:
        done = bulk_generation_schedule(context)
    assert isinstance(done, dg.SkipReason)
