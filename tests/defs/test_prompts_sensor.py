"""Dropping a CSV in the prompts folder registers a partition and asks for a run."""

import dagster as dg

from imagegen_pipeline.defs.prompts.sensors import prompt_files_sensor
from imagegen_pipeline.defs.storage import StorageResource


def test_new_and_changed_files_become_partitions_and_runs(tmp_path, dagster_instance):
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "cats.csv").write_text("prompt\na cat\n")
    (folder / "My Dogs.csv").write_text("prompt\na dog\n")
    storage = StorageResource(prompts_dir=str(folder), base=str(tmp_path / "storage"))

    context = dg.build_sensor_context(instance=dagster_instance, resources={"storage": storage})
    result = prompt_files_sensor(context)
    assert sorted(r.partition_key for r in result.run_requests) == ["My_Dogs", "cats"]
    assert result.dynamic_partitions_requests[0].partition_keys == ["My_Dogs", "cats"]
    dagster_instance.add_dynamic_partitions("prompt_sets", ["My_Dogs", "cats"])

    context = dg.build_sensor_context(
        instance=dagster_instance, resources={"storage": storage}, cursor=result.cursor
    )
    assert isinstance(prompt_files_sensor(context), dg.SkipReason)

    (folder / "cats.csv").write_text("prompt\na cat\na kitten\n")
    context = dg.build_sensor_context(
        instance=dagster_instance, resources={"storage": storage}, cursor=result.cursor
    )
    changed = prompt_files_sensor(context)
    assert [r.partition_key for r in changed.run_requests] == ["cats"]
    assert changed.dynamic_partitions_requests == []
