"""A prompt set in Gemini batch mode (its sidecar says so) and rows with backends "any", run by
Dagster against the loopback Batch API: submit, leave, collect through the sensor's run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from imagegen_pipeline.definitions import defs
from imagegen_pipeline.defs.images.batch_sensor import gemini_batch_sensor
from imagegen_pipeline.run_metadata import load_run_metadata
from imagegen_pipeline.steps.gemini_batch import open_batch_jobs
from imagegen_pipeline.storage import Storage
from tests.defs.test_gemini_partition import (
    GEMINI_PARTITION,
    PROMPT_SET,
    GeminiResource,
    home,
    images_output,
    make_resources,
    materialize_gemini_partition,
)
from tests.support.fake_gemini_batch import FakeGeminiBatch
from tests.support.fake_servers import FAKE_GEMINI_KEY, FakeGemini

CSV = """prompt_id,prompt,num_images,backends
fox,a red fox asleep in the snow,2,gemini
owl,a brass clockwork owl,1,gemini
"""
HYBRID_CSV = """prompt_id,prompt,num_images,backends
a,a quiet lake at dawn,2,any
b,a busy market at noon,2,any
c,a mountain hut in fog,1,any
d,a city tram at night,1,flux_schnell
"""


@pytest.fixture
def batch_server() -> Iterator[FakeGeminiBatch]:
    with FakeGeminiBatch(api_key=FAKE_GEMINI_KEY, pending_seconds=0.3, running_seconds=0.1) as s:
        yield s


@pytest.fixture
def text_server() -> Iterator[FakeGemini]:
    with FakeGemini(api_key=FAKE_GEMINI_KEY) as server:
        yield server


def resources_for(tmp_path, folder, batch_server, text_server, **gemini) -> dict:
    resources = make_resources(tmp_path, folder, batch_server, text_server)
    resources["gemini"] = GeminiResource(
        base_url=batch_server.url,
        timeout_seconds=2.0,
        initial_backoff_seconds=0.01,
        max_backoff_seconds=0.05,
        batch_poll_seconds=0.05,
        **gemini,
    )
    return resources


def test_a_batch_set_submits_leaves_and_is_collected_by_the_sensor_run(
    tmp_path: Path, batch_server, text_server, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("GEMINI_API_KEY", FAKE_GEMINI_KEY)
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / f"{PROMPT_SET}.csv").write_text(CSV)
    (folder / f"{PROMPT_SET}.toml").write_text('[gemini]\nmode = "batch"\n')  # this set only
    resources = resources_for(tmp_path, folder, batch_server, text_server, batch_wait_seconds=0.0)
    storage = Storage(tmp_path / "storage")

    with dg.instance_for_test(temp_dir=home(tmp_path)) as instance:
        _, submitted = materialize_gemini_partition(instance, resources)

        assert submitted.success  # images still in a batch job fail nothing
        table, metadata = images_output(instance, submitted)
        assert sorted(table["status"]) == ["pending"] * 3 and metadata["mode"] == "batch"
        [job] = open_batch_jobs(storage, PROMPT_SET, "gemini")
        assert job.job_name in batch_server.jobs and len(json.loads(job.keys)) == 3
        assert not [r for r in batch_server.requests if r.path.endswith(":generateContent")]

        sensor_resources = {"storage": resources["storage"], "gemini": resources["gemini"]}

        def tick() -> dg.SensorResult:
            with (
                dg.partition_loading_context(dynamic_partitions_store=instance),
                dg.build_sensor_context(
                    instance=instance, resources=sensor_resources, definitions=defs
                ) as context,
            ):
                return gemini_batch_sensor.evaluate_tick(context)

        batch_server.pending_seconds = 60.0  # still pending at the first tick
        early = tick()
        assert not early.run_requests and "none finished" in early.skip_message
        batch_server.pending_seconds = batch_server.running_seconds = 0.0  # finished now
        [request] = tick().run_requests
        assert request.partition_key == str(GEMINI_PARTITION)
        assert request.run_key == f"gemini-batch:{job.job_name}:JOB_STATE_SUCCEEDED"

        collected = dg.materialize(
            [*_assets()],
            selection=["images"],
            partition_key=GEMINI_PARTITION,
            resources=resources,
            instance=instance,
        )
        table, _ = images_output(instance, collected)

    assert sorted(table["status"]) == ["ok"] * 3
    assert batch_server.batch_creates == 1  # collected, not submitted again
    assert open_batch_jobs(storage) == []
    steps = load_run_metadata(storage, "steps")
    assert list(steps["pending"]) == [3, 0] and list(steps["generated"]) == [0, 3]
    assert steps["cost_usd"].iloc[1] == pytest.approx(table["cost_usd"].sum())


def _assets():
    from imagegen_pipeline.defs.images.assets import images
    from imagegen_pipeline.defs.prompts.assets import enhanced_prompts, prompts

    return prompts, enhanced_prompts, images


def test_any_rows_overflow_to_gemini_past_the_local_queue_limit(
    tmp_path: Path, batch_server, text_server, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("GEMINI_API_KEY", FAKE_GEMINI_KEY)
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / f"{PROMPT_SET}.csv").write_text(HYBRID_CSV)
    # No measured rate yet: 10 s per image; the flux-only row already queues 10 s, row "a"
    # brings it to 30 s, within 35 s; "b" would make 50 s: it overflows, and so does "c".
    resources = resources_for(
        tmp_path,
        folder,
        batch_server,
        text_server,
        overflow_seconds_per_image=10.0,
        overflow_queue_limit_seconds=35.0,
    )

    with dg.instance_for_test(temp_dir=home(tmp_path)) as instance:
        _, result = materialize_gemini_partition(instance, resources)
        table, metadata = images_output(instance, result)

    assert result.success
    assert sorted(set(table["prompt_id"])) == ["b", "c"]  # the overflow, online here
    assert sorted(table["status"]) == ["ok"] * 3
    routing = json.loads((tmp_path / "storage/routing" / f"{PROMPT_SET}.json").read_text())
    assert routing["rows"] == {"a": "flux_schnell", "b": "gemini", "c": "gemini"}
    assert routing["queue_seconds"] == 30.0 and routing["measured"] is False
    assert metadata["hybrid_local_images"] == 2 and metadata["hybrid_overflow_images"] == 3
    [step] = load_run_metadata(tmp_path / "storage", "steps").to_dict("records")
    assert (step["hybrid_local_images"], step["hybrid_overflow_images"]) == (2, 3)
    assert step["hybrid_queue_seconds"] == 30.0
    enhanced = pd.read_parquet(
        tmp_path / "storage/tables/enhanced_prompts" / f"{PROMPT_SET}.parquet"
    )
    assert [list(b) for b in enhanced["backends"]][:3] == [["any"]] * 3  # routed at generation
