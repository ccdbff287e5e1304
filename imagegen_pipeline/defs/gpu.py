"""GPU placement of every GPU step, in one place: the concurrency pool and executor tags.

- ``pool``: Dagster's ``gpu`` concurrency pool; dagster.yaml limits it to one step at a time,
  i.e. one GPU step per GPU on a one-GPU machine. Raise the limit with the number of GPUs.
- ``dagster-k8s/config``: with the k8s executor each step is a pod that asks for GPUs.
- ``dagster-celery/queue``: with the celery executor GPU steps go to workers of the ``gpu``
  queue (``dagster-celery worker start -q gpu`` on GPU machines).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import dagster as dg

from imagegen_pipeline.model_weights import ModelWeightsMissingError

GPU_POOL = "gpu"
GPU_CELERY_QUEUE = "gpu"


def gpu_op_tags(gpus: int = 1) -> dict[str, Any]:
    """Op tags that ask the distributed executors for ``gpus`` GPUs."""
    return {
        "dagster-k8s/config": {
            "container_config": {"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}},
        },
        "dagster-celery/queue": GPU_CELERY_QUEUE,
    }


class Unloadable(Protocol):
    """A model wrapper that can free what it loaded."""

    def unload(self) -> None: ...


@contextmanager
def model_step(model: Unloadable) -> Iterator[None]:
    """The body of a model step: missing weights become one clear failure, and the model is
    freed at the end so the next step in this process has the GPU to itself."""
    try:
        yield
    except ModelWeightsMissingError as error:
        raise dg.Failure(description=str(error)) from None
    finally:
        model.unload()
