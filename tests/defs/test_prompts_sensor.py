"""Dropping a CSV in the prompts folder registers a partition and asks for a run."""

from pathlib import Path

import dagster as dg
import pandas as pd

from imagegen_pipeline.defs.prompts.assets import enhanced_prompts, prompt_checks, prompts
from imagegen_pipeline.defs.prompts.sensors import prompt_files_sensor
from imagegen_pipeline.defs.resources import default_resources
from imagegen_pipeline.defs.storage import StorageResource, TableIOManager
from imagegen_pipeline.local_runner import range_tags
from imagegen_pipeline.prompt_folder import prompt_set_name


def test_new_and_changed_files_become_partitions_and_runs(tmp_path, dagster_instance):
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "cats.csv").write_text("prompt\na cat\n")
    (folder / "My Dogs.csv").write_text("prompt\na dog\n")
    storage = StorageResource(prompts_dir=str(folder), base=str(tmp_path / "storage"))

    context = dg.build_sensor_context(instance=dagster_instance, resources={"storage": storage})
    result = prompt_files_sensor(context)
    keys = sorted([prompt_set_name(Path("My Dogs.csv")), "cats"])
    assert sorted(r.partition_key for r in result.run_requests) == keys
    assert result.dynamic_partitions_requests[0].partition_keys == keys
    dagster_instance.add_dynamic_partitions("prompt_sets", keys)

    context = dg.build_sensor_context(
        instance=dagster_instance, resources={"storage": storage}, cursor=result.cursor
    )
    unchanged = prompt_files_sensor(context)
    assert not unchanged.run_requests and "No new or changed CSV" in str(unchanged.skip_reason)

    (folder / "cats.csv").write_text("prompt\na cat\na kitten\n")
    context = dg.build_sensor_context(
        instance=dagster_instance, resources={"storage": storage}, cursor=result.cursor
    )
    changed = prompt_files_sensor(context)
    assert [r.partition_key for r in changed.run_requests] == ["cats"]
    assert changed.dynamic_partitions_requests == []

    # A sidecar of set defaults dropped beside a CSV changes that set.
    (folder / "cats.toml").write_text('style = "anime"\n')
    context = dg.build_sensor_context(
        instance=dagster_instance, resources={"storage": storage}, cursor=changed.cursor
    )
    assert [r.partition_key for r in prompt_files_sensor(context).run_requests] == ["cats"]


def test_two_files_of_one_set_fail_that_set_alone(tmp_path, dagster_instance, capfd):
    """x.csv and x.CSV are one set: the sensor logs it and the prepare run refuses that set
    naming both files; a 238-character name and a plain one in the same run go on."""
    folder = tmp_path / "prompts"
    folder.mkdir()
    long_stem = "a very long name " * 14  # 238 characters: 255 bytes with .csv
    for name in ("x.csv", "x.CSV", f"{long_stem}.csv", "good.csv"):
        (folder / name).write_text("prompt\na cat on a mat\n")
    storage = StorageResource(prompts_dir=str(folder), base=str(tmp_path / "storage"))

    context = dg.build_sensor_context(instance=dagster_instance, resources={"storage": storage})
    result = prompt_files_sensor(context)
    keys = sorted(r.partition_key for r in result.run_requests)
    long_key = prompt_set_name(Path(f"{long_stem}.csv"))
    assert keys == sorted(["x", long_key, "good"])
    errors = [line for line in capfd.readouterr().err.splitlines() if "ERROR" in line]
    assert len(errors) == 1
    assert str(folder / "x.csv") in errors[0] and str(folder / "x.CSV") in errors[0]

    dagster_instance.add_dynamic_partitions("prompt_sets", keys)
    order = dagster_instance.get_dynamic_partitions("prompt_sets")
    resources = {
        **default_resources(),
        "storage": storage,
        "io_manager": TableIOManager(storage=storage),
    }
    run = dg.materialize(
        [prompts, prompt_checks, enhanced_prompts],
        instance=dagster_instance,
        resources=resources,
        tags=range_tags(order[0], order[-1]),
    )
    assert run.success
    tables = tmp_path / "storage" / "tables"
    for key in (long_key, "good"):
        assert len(pd.read_parquet(tables / "enhanced_prompts" / f"{key}.parquet")) == 1
    refused = pd.read_parquet(tables / "rejected_prompts" / "x.parquet")
    assert refused["field"].tolist() == ["file"]
    assert str(folder / "x.csv") in refused["reason"][0]
    assert str(folder / "x.CSV") in refused["reason"][0]


def test_a_set_prepared_before_the_first_tick_is_not_prepared_again(tmp_path, dagster_instance):
    """`make demo`, then `make ui`: the sensor's first tick finds the demo's sets prepared from
    the files as they are, and asks for nothing; an edited file, or one whose enhancement
    never finished, is prepared."""
    folder = tmp_path / "prompts"
    folder.mkdir()
    for name in ("done", "edited", "unfinished"):
        (folder / f"{name}.csv").write_text(f"prompt\na {name} cat\n")
    storage = StorageResource(prompts_dir=str(folder), base=str(tmp_path / "storage"))
    dagster_instance.add_dynamic_partitions("prompt_sets", ["done", "edited", "unfinished"])
    resources = {
        **default_resources(),
        "storage": storage,
        "io_manager": TableIOManager(storage=storage),
    }
    for selection, (first, last) in (
        ([prompts, prompt_checks, enhanced_prompts], ("done", "edited")),
        ([prompts, prompt_checks], ("unfinished", "unfinished")),
    ):
        run = dg.materialize(
            selection,
            instance=dagster_instance,
            resources=resources,
            tags=range_tags(first, last),
        )
        assert run.success
    (folder / "edited.csv").write_text("prompt\na cat, edited since\n")

    context = dg.build_sensor_context(instance=dagster_instance, resources={"storage": storage})
    first_tick = prompt_files_sensor(context)
    assert sorted(r.partition_key for r in first_tick.run_requests) == ["edited", "unfinished"]
    context = dg.build_sensor_context(
        instance=dagster_instance, resources={"storage": storage}, cursor=first_tick.cursor
    )
    (folder / "done.csv").write_text("prompt\na done cat\na new row\n")
    assert [r.partition_key for r in prompt_files_sensor(context).run_requests] == ["done"]
