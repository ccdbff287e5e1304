"""Two celery GPU workers running runs of the same partition at the same time make each image
once: the images step of the run that comes second waits on the partition's claim (a
conditional PUT in the moto S3 bucket), then lists the folder and finds every image made.

The services and the first gpu worker are test_celery_pipeline's ``pipeline`` fixture (a module
of its own here); this test adds a second gpu worker and raises the gpu pool to two slots so
both runs' GPU steps can run at once, one on each worker. The test itself holds the partition's
claim until both steps wait for it: on a busy machine two orchestrators started together can
otherwise reach their GPU steps one after the other, and nothing would be tested.
"""

from __future__ import annotations

import time
import uuid

import pytest

from tests.distributed.test_celery_pipeline import (  # noqa: F401 (pipeline: the fixture)
    PNG_NAME,
    STORAGE_PREFIX,
    Pipeline,
    events,
    images_only,
    pipeline,
    prepare,
    slots,
)

dg = pytest.importorskip("dagster")

from dagster import DagsterEventType  # noqa: E402

from imagegen_pipeline.claims import Claims  # noqa: E402
from imagegen_pipeline.defs.gpu import GPU_CELERY_QUEUE, GPU_POOL  # noqa: E402
from imagegen_pipeline.run_metadata import load_run_metadata  # noqa: E402
from tests.services import celery_workers_by_step  # noqa: E402

GPU_STEP = "images.generate_on_gpu"
PROMPTS = 4
IMAGES_PER_PROMPT = 3


pytestmark = pytest.mark.slow  # minutes: a celery stack and runs on it


def step_log_messages(pipe: Pipeline, run_id: str) -> list[str]:
    records = pipe.instance.get_records_for_run(run_id, limit=100_000).records
    return [r.event_log_entry.user_message for r in records if r.event_log_entry.user_message]


@pytest.mark.timeout(900)
def test_two_gpu_workers_running_one_partition_at_once_make_each_image_once(
    pipeline: Pipeline,  # noqa: F811
) -> None:
    pipe = pipeline
    try:
        check_two_gpu_workers_make_each_image_once(pipe)
    finally:
        # test_celery_pipeline counts every object under the prefix: leave the bucket empty
        pipe.fs().rm(f"{pipe.s3.bucket}/{STORAGE_PREFIX}", recursive=True)


def check_two_gpu_workers_make_each_image_once(pipe: Pipeline) -> None:
    second_gpu = pipe.start_worker(f"gpu2-{uuid.uuid4().hex[:4]}", [GPU_CELERY_QUEUE])
    pipe.instance.event_log_storage.set_concurrency_slots(GPU_POOL, 2)
    try:
        rows = [f"p{i},a lantern number {i} on a pier,,{IMAGES_PER_PROMPT}" for i in range(PROMPTS)]
        (name,) = pipe.add_prompt_sets(
            {"claimed": "prompt_id,prompt,style,num_images\n" + "\n".join(rows)}
        )
        pipe.run([prepare([name])], label="claims-prepare")
        claim_name = f"images/{name}/flux_schnell"
        held, _ = Claims(pipe.storage()).try_acquire(claim_name, log=lambda _: None)
        assert held is not None
        started_at = time.time()

        def release_when_both_wait() -> None:
            deadline = time.monotonic() + 600
            while len(runs_waiting_for(pipe, claim_name, started_at)) < 2:
                assert time.monotonic() < deadline, "the two GPU steps never both waited"
                time.sleep(1)
            held.release()

        # two orchestrators at once, each with one run of the same partition
        (first,), (second,) = pipe.run(
            [images_only(name)],
            [images_only(name)],
            label="claims-images",
            while_running=release_when_both_wait,
        )
    finally:
        pipe.instance.event_log_storage.set_concurrency_slots(GPU_POOL, 1)
        second_gpu.stop()

    # the premise: the two runs' GPU steps ran on the two workers, both waiting for the claim
    placed = {celery_workers_by_step(pipe.instance, r)[GPU_STEP][0] for r in (first, second)}
    assert placed == {pipe.gpu_worker.hostname, second_gpu.hostname}
    assert runs_waiting_for(pipe, claim_name, started_at) == {first, second}
    for run_id in (first, second):
        assert not events(pipe.instance, run_id, DagsterEventType.STEP_FAILURE)

    planned = PROMPTS * IMAGES_PER_PROMPT
    images = load_run_metadata(pipe.storage(), "images", prompt_set=name, backend="flux_schnell")
    ok = images[images["status"] == "ok"]
    assert ok["image_id"].is_unique and len(ok) == planned  # each image made once
    (maker,) = set(ok["run_id"])  # by the run that got the claim first
    # The other run found them all: no row per image (its step row counts them, below).
    assert not (images["run_id"] == ({first, second} - {maker}).pop()).any()
    keys = sorted(pipe.objects(f"images/{name}"))
    png_slots = slots(keys, PNG_NAME)
    assert len(png_slots) == planned and set(png_slots.values()) == {1}
    assert not pipe.objects("claims")  # every claim released
    steps = pipe.step_rows([first, second])
    assert sorted(steps.loc[steps["asset"] == "images", "generated"]) == [0, planned]
    assert sorted(steps.loc[steps["asset"] == "images", "skipped_existing"]) == [0, planned]


def runs_waiting_for(pipe: Pipeline, claim_name: str, since: float) -> set[str]:
    """The runs started after ``since`` whose step logged that it waits for ``claim_name``."""
    runs = [
        r.dagster_run.run_id
        for r in pipe.instance.get_run_records()
        if r.create_timestamp.timestamp() >= since
    ]
    return {
        run_id
        for run_id in runs
        if any(f"Waiting for {claim_name}" in m for m in step_log_messages(pipe, run_id))
    }
