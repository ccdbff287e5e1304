"""GPU placement of every GPU step, in one place, and the model each step works with.

- ``pool``: Dagster's ``gpu`` concurrency pool; dagster.yaml limits it to one step at a time,
  i.e. one GPU step per GPU on a one-GPU machine. Raise the limit with the number of GPUs.
- ``dagster-k8s/config``: with the k8s executor each GPU step is a pod that asks for GPUs and
  is scheduled on GPU nodes.
- ``dagster-celery/queue``: with the celery executor GPU steps go to workers of the ``gpu``
  queue (one ``dagster-celery worker start -q gpu`` per GPU); every other step goes to the
  default queue.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg

from imagegen_pipeline.defs.model_resources import settings_of
from imagegen_pipeline.model_cache import WARM_MODELS
from imagegen_pipeline.model_resolution import InvalidModelSettings, WarmModel, warm_model
from imagegen_pipeline.model_weights import ModelWeightsMissingError
from imagegen_pipeline.project_config import ProjectConfig
from imagegen_pipeline.registry import ModelSpec

GPU_POOL = "gpu"
GPU_CELERY_QUEUE = "gpu"


def gpu_op_tags(gpus: int = 1) -> dict[str, Any]:
    """Op tags that ask the distributed executors for ``gpus`` GPUs."""
    return {
        "dagster-k8s/config": {
            "container_config": {"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}},
            # GPU nodes are usually tainted so that only pods asking for GPUs land there.
            "pod_spec_config": {
                "tolerations": [
                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                ],
            },
        },
        "dagster-celery/queue": GPU_CELERY_QUEUE,
    }


def refuse_literal_key(resource: object, field: str, variable: str | None) -> None:
    """Fail on an API key typed into run config: Dagster stores run config in its run database
    (and shows it in the UI), so a key there is a leaked key. Keys come from the environment."""
    if getattr(resource, field, None):
        raise dg.Failure(
            description=f"{field} is set in run config, where Dagster stores it in its run "
            f"database: remove it and set {variable or 'the key variable'} in the environment "
            "of the webserver, daemon and workers instead."
        )


@contextmanager
def model_for_step(
    context: dg.OpExecutionContext | dg.AssetExecutionContext,
    spec: ModelSpec,
    project: ProjectConfig,
) -> Iterator[WarmModel]:
    """The warm model of ``spec`` configured by its resource, created when the step first
    uses it; missing weights or keys become one clear step failure. The model stays in the
    process's cache for the next step; the cache frees others when the budget is exceeded."""
    resource = getattr(context.resources, spec.name)
    refuse_literal_key(resource, "api_key", spec.key_env_var)
    try:
        warm = warm_model(spec, settings_of(resource, spec.settings), project)
    except ValueError as error:  # settings a model cannot run with, a missing API key
        raise dg.Failure(description=f"{spec.name}: {error}") from None
    if warm.resolved is not None and warm.resolved.notice:
        context.log.warning(warm.resolved.notice)
    try:
        yield warm
    except ModelWeightsMissingError as error:
        raise dg.Failure(description=str(error)) from None
    except InvalidModelSettings as error:
        raise dg.Failure(description=f"{spec.name}: {error}") from None
    finally:
        WARM_MODELS.make_room(keep=spec.name)
