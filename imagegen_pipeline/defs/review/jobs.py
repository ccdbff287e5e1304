"""``regenerate_images``: make rejected images again with new seeds, one op for every backend.

Launched by ``regenerate_rejected_sensor`` (one run per backend, listing the rejected images) or
by hand, from the launchpad or ``imagegen regenerate``, for one image slot: the launchpad config
holds the CLI's fields (prompt_set, prompt_id, index, backend, seed, new_seed). The backend's
resource is its usual one, so its settings, budget and GPU placement are those of ``images``.
"""

import dagster as dg
import pydantic

from imagegen_pipeline.defs.gpu import GPU_POOL, gpu_op_tags, model_for_step
from imagegen_pipeline.defs.step_records import generation_step_record, write_step_record
from imagegen_pipeline.project_config import load_project_config
from imagegen_pipeline.registry import IMAGE_BACKENDS, backend_spec
from imagegen_pipeline.steps.images import ImagesStepContext, run_images_step
from imagegen_pipeline.steps.regenerate import (
    Replacement,
    image_rows,
    newest_in_slot,
    plan_replacements,
)
from imagegen_pipeline.storage import Storage


class RejectedImage(dg.Config):
    """One image to replace, as the sensor names it."""

    prompt_set: str
    backend: str
    image_id: str


class RegenerateConfig(dg.Config):
    """Which images to make again: one slot (prompt_set, prompt_id, index), or ``rejected``."""

    prompt_set: str = ""  # with prompt_id: the slot to make again
    prompt_id: str = ""
    index: int = 0  # the image index within the prompt (image_index)
    backend: str = ""  # "" = every backend that has an image in that slot
    seed: int | None = None  # this exact seed; None with new_seed: the slot's next seed
    new_seed: bool = True  # the slot's next deterministic seed (ignored when seed is set)
    rejected: list[RejectedImage] = pydantic.Field(
        default_factory=list
    )  # the sensor's list of rejected images


def requested(config: RegenerateConfig, storage: Storage) -> list[Replacement]:
    """The replacements a run's config asks for; a slot without an image is a clear failure."""
    wanted = [Replacement(r.prompt_set, r.backend, r.image_id) for r in config.rejected]
    if not config.prompt_id:
        return wanted
    if config.seed is None and not config.new_seed:
        raise dg.Failure(description="give a seed, or new_seed: true")
    names = [config.backend] if config.backend else [spec.name for spec in IMAGE_BACKENDS]
    for backend in names:
        rows = image_rows(storage, config.prompt_set, backend)
        current = newest_in_slot(rows, config.prompt_id, config.index)
        if current is not None:
            wanted.append(Replacement(config.prompt_set, backend, current, config.seed))
    if not wanted:
        where = f"{config.prompt_set}/{config.backend or '*'}"
        raise dg.Failure(
            description=f"{where}: no image {config.prompt_id}[{config.index}] to make again"
        )
    return wanted


@dg.op(
    required_resource_keys={"storage", *(spec.name for spec in IMAGE_BACKENDS)},
    pool=GPU_POOL,
    tags=gpu_op_tags(),
)
def regenerate(context: dg.OpExecutionContext, config: RegenerateConfig) -> None:
    """Make each requested image again with its new seed; the new row names the old image."""
    resource = context.resources.storage
    storage = resource.storage()
    project = load_project_config()
    by_partition: dict[tuple[str, str], list[Replacement]] = {}
    for wanted in requested(config, storage):
        by_partition.setdefault((wanted.backend, wanted.prompt_set), []).append(wanted)
    made, problems_seen = 0, []
    for backend in sorted({backend for backend, _ in by_partition}):
        spec = backend_spec(backend)
        with model_for_step(context, spec, project) as warm:
            target = warm.settings.image_target(backend, warm.model_id)
            for (name, prompt_set), replacements in sorted(by_partition.items()):
                if name != backend:
                    continue
                rows = image_rows(storage, prompt_set, backend)
                planned, problems = plan_replacements(rows, replacements, target)
                for problem in problems:
                    context.log.warning(problem)
                problems_seen += problems
                where = ImagesStepContext(
                    storage=storage,
                    prompt_set=prompt_set,
                    run_id=context.run.run_id,
                    png_compress_level=resource.png_compress_level,
                    writer_threads=resource.writer_threads,
                    verify=resource.verify,
                )
                outcome = run_images_step(
                    target, lambda warm=warm: warm.model, planned, where, log=context.log.info
                )
                record = generation_step_record(
                    context, "regenerate", prompt_set, backend, target.settings, warm.device,
                    outcome, is_local=spec.is_local,
                )  # fmt: skip
                write_step_record(storage, record)
                made += outcome.counts.get("ok", 0)
                for item, row in zip(planned, outcome.records, strict=True):
                    request = item.request
                    context.log.info(
                        f"{prompt_set}/{backend} {request.prompt_id}[{request.image_index}]: "
                        f"{row.status}, seed {request.seed}, replaces {item.replaces[:16]}"
                    )
    if problems_seen and not made:
        raise dg.Failure(description=f"Nothing made again: {'; '.join(problems_seen[:5])}")
    context.add_output_metadata({"images_made": made})


@dg.job(
    name="regenerate_images",
    description="Make rejected images again with new seeds (the sensor), or one image slot.",
)
def regenerate_images_job() -> None:
    regenerate()
