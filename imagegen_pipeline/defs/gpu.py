"""GPU placement of every GPU step, in one place: the concurrency pool and executor tags.

- ``pool``: Dagster's ``gpu`` concurrency pool; dagster.yaml limits it to one step at a time,
  i.e. one GPU step per GPU on a one-GPU machine. Raise the limit with the number of GPUs.
- ``dagster-k8s/config``: with the k8s executor each step is a pod that asks for GPUs.
- ``dagster-celery/queue``: with the celery executor GPU steps go to workers of the ``gpu``
  queue (``dagster-celery worker start -q gpu`` on GPU machines).
"""

from typing import Any

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
