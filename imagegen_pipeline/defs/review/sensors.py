"""Reject means replace: ``regenerate_rejected_sensor`` makes rejected images again, and
``score_replacements_sensor`` brings their scores, keepers and clips up to date.

It follows the verdict parts under ``reviews/`` (its cursor is the name of the newest part
handled; names start with their time) and, once reviewers have paused for
``review_pause_seconds``, asks for one ``regenerate_images`` run per backend for the images
rejected since, whose latest verdict is still a reject and that nothing replaces
yet. The run key names the images, so a tick that sees the same rejects asks for nothing new.
Waiting for the pause makes a reviewer's burst of rejects one run (one model load), not one run
per sensor tick that fell between two key presses.

After each successful ``regenerate_images`` run (the sensor's, the launchpad's or
``imagegen regenerate``'s), ``score_replacements_sensor`` asks for one ``generate_images`` run
per backend over the prompt sets where it made replacements: the images step lists them beside
the CSV's images (generating nothing), then quality scores them, keepers chooses again and clips
animates the new keepers, so a reviewer sees a replacement scored within a minute or so.
"""

import hashlib
from pathlib import PurePosixPath

import dagster as dg

from imagegen_pipeline.defs.images.sensors import generation_requests
from imagegen_pipeline.defs.jobs import generate_images_job
from imagegen_pipeline.defs.review.jobs import regenerate_images_job
from imagegen_pipeline.project_config import load_project_config
from imagegen_pipeline.records import utc_now
from imagegen_pipeline.reviews import part_time, read_verdict_parts, reviews_folder
from imagegen_pipeline.steps.regenerate import made_by_run, rejects_to_replace
from imagegen_pipeline.storage import Storage


def new_parts(storage: Storage, cursor: str) -> list[str]:
    """Verdict parts (relative to reviews/) whose file name sorts after ``cursor``."""
    listed = storage.list_files(reviews_folder(storage))
    return sorted(
        (n for n in listed if PurePosixPath(n).name > cursor), key=lambda n: PurePosixPath(n).name
    )


@dg.sensor(
    job=regenerate_images_job,
    minimum_interval_seconds=load_project_config().sensor_interval_seconds,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def regenerate_rejected_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """When reviewers reject images, make them again with new seeds: one run per backend."""
    config = load_project_config()
    storage = Storage(config.storage)
    parts = new_parts(storage, context.cursor or "")
    if not parts:
        return dg.SensorResult(skip_reason="No new verdicts.", cursor=context.cursor)
    quiet = (utc_now() - part_time(parts[-1])).total_seconds()
    if quiet < config.review_pause_seconds:
        return dg.SensorResult(
            skip_reason=f"Reviewers are at work: waiting for {config.review_pause_seconds} s "
            f"without a new verdict ({quiet:.0f} s so far).",
            cursor=context.cursor,
        )
    recent = read_verdict_parts(storage, parts)
    by_backend: dict[str, list[dict[str, str]]] = {}
    for wanted in rejects_to_replace(recent, storage):
        by_backend.setdefault(wanted.backend, []).append(
            {
                "prompt_set": wanted.prompt_set,
                "backend": wanted.backend,
                "image_id": wanted.image_id,
            }
        )
    requests = []
    for backend, rejected in sorted(by_backend.items()):
        ids = ",".join(sorted(f"{r['prompt_set']}/{r['image_id']}" for r in rejected))
        digest = hashlib.sha256(ids.encode()).hexdigest()[:16]
        config = {"ops": {"regenerate": {"config": {"rejected": rejected}}}}
        tags = {"imagegen/reason": "rejected", "imagegen/backend": backend}
        requests.append(
            dg.RunRequest(run_key=f"rejected:{backend}:{digest}", run_config=config, tags=tags)
        )
    return dg.SensorResult(run_requests=requests, cursor=PurePosixPath(parts[-1]).name)


def prompt_sets_asked(run_config: dict) -> set[str]:
    """The prompt sets a ``regenerate_images`` run's config names (a slot, or rejected images)."""
    asked = run_config.get("ops", {}).get("regenerate", {}).get("config", {})
    named = {rejected["prompt_set"] for rejected in asked.get("rejected", [])}
    return named | ({asked["prompt_set"]} if asked.get("prompt_set") else set())


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[regenerate_images_job],
    request_job=generate_images_job,
    minimum_interval_seconds=load_project_config().sensor_interval_seconds,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def score_replacements_sensor(context: dg.RunStatusSensorContext):
    """After images are made again, score them, choose the keepers again and animate them."""
    run = context.dagster_run
    storage = Storage(load_project_config().storage)
    made = made_by_run(storage, run.run_id, prompt_sets_asked(run.run_config))
    if not made:
        return dg.SkipReason(f"Run {run.run_id[:8]} made no replacement.")
    return generation_requests(context.instance, made, f"replaced:{run.run_id}")
