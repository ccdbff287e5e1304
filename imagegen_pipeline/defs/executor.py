"""Which Dagster executor runs the steps of a run: one switch, ``executor`` in imagegen.toml
(or IMAGEGEN_EXECUTOR).

- ``in_process`` (default, one machine): the steps of a run execute one after another in the
  run's own process. A run's steps form a chain anyway, so nothing runs less in parallel; no
  step pays a process start; and models stay warm between the steps of a run (the CLIP model of
  ``quality`` is reused by ``video_quality``). Runs still execute side by side.
- ``multiprocess``: Dagster's default, a process per step, forked from a forkserver that has
  the project's modules preloaded.
- ``celery``: steps become tasks on a broker; GPU steps go to the ``gpu`` queue. Needs the
  ``[distributed]`` extra, ``celery_broker`` (IMAGEGEN_CELERY_BROKER, e.g. redis://host:6379/0)
  and a Postgres instance (deploy/celery/dagster.yaml).
- ``k8s``: each step is a Kubernetes job (dagster-k8s); GPU steps ask for nvidia.com/gpu.
"""

import dagster as dg

from imagegen_pipeline.project_config import load_project_config

EXECUTORS = ("in_process", "multiprocess", "celery", "k8s")


def project_executor() -> dg.ExecutorDefinition:
    """The executor ``executor`` names."""
    project = load_project_config()
    name = project.executor
    if name == "in_process":
        return dg.in_process_executor
    if name == "multiprocess":
        return dg.multiprocess_executor.configured(
            {"start_method": {"forkserver": {"preload_modules": ["imagegen_pipeline.definitions"]}}}
        )
    if name == "celery":
        from dagster_celery import celery_executor

        broker = project.celery_broker
        return celery_executor.configured(
            {"broker": broker, "backend": project.celery_backend or broker}
        )
    if name == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    raise ValueError(
        f"unknown executor {name!r} in the project configuration; use one of {EXECUTORS}"
    )
