"""``regenerate_rejected_sensor``: reject means replace.

It follows the verdict parts under ``reviews/`` (its cursor is the name of the newest part
handled; names start with their time) and, once reviewers have paused for
``review_pause_seconds``, asks for one ``regenerate_images`` run per backend for the images
rejected since, whose latest verdict is still a reject and that nothing replaces
yet. The run key names the images, so a tick that sees the same rejects asks for nothing new.
Waiting for the pause makes a reviewer's burst of rejects one run (one model load), not one run
per sensor tick that fell between two key presses.
"""

import hashlib
from pathlib import PurePosixPath

import dagster as dg

from imagegen_pipeline.defs.review.jobs import regenerate_images_job
from imagegen_pipeline.project_config import load_project_config
from imagegen_pipeline.records import utc_now
from imagegen_pipeline.reviews import part_time, read_verdict_parts, reviews_folder
from imagegen_pipeline.steps.regenerate import rejects_to_replace
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
