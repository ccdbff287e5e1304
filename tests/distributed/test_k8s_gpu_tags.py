"""The GPU op tags, read by dagster-k8s' own code, give the step's pod a GPU.

This follows ``K8sStepHandler.launch_step`` of ``k8s_job_executor`` (dagster_k8s/executor.py):
the step's tags from the execution plan -> ``get_user_defined_k8s_config`` -> merged into the
executor's ``K8sContainerContext`` -> ``construct_dagster_k8s_job`` -> the V1Job that would be
created. No cluster is needed.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
import pytest

pytest.importorskip("dagster_k8s")

from dagster._core.execution.api import create_execution_plan
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import (
    DagsterK8sJobConfig,
    UserDefinedDagsterK8sConfig,
    construct_dagster_k8s_job,
    get_user_defined_k8s_config,
)
from kubernetes.client import ApiClient

from imagegen_pipeline.defs.gpu import gpu_op_tags

# What gpu_op_tags could add so GPU pods land on GPU nodes (see test_recommended_...): the
# label NVIDIA's GPU feature discovery / GKE / EKS put on GPU nodes, and the taint GPU node
# pools usually carry.
GPU_POD_SPEC_CONFIG = {
    "node_selector": {"nvidia.com/gpu.present": "true"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}


def _step_tags(op_tags: dict[str, Any]) -> dict[str, str]:
    """The tags of a step of an op with ``op_tags``, as the k8s executor gets them from the
    execution plan (``StepHandlerContext.step_tags``): Dagster stores dict values as JSON."""

    @dg.op(tags=op_tags)
    def gpu_step() -> None: ...

    @dg.op
    def cpu_step() -> None: ...

    @dg.job
    def tagged_job() -> None:
        gpu_step()
        cpu_step()

    plan = create_execution_plan(tagged_job)
    tags = {step.key: dict(step.tags) for step in plan.steps}
    assert "dagster-k8s/config" not in tags["cpu_step"]
    return tags["gpu_step"]


def _step_job_manifest(
    step_tags: dict[str, str], executor_context: K8sContainerContext | None = None
) -> dict[str, Any]:
    """The Kubernetes Job k8s_job_executor would create for a step with ``step_tags``."""
    context = (executor_context or K8sContainerContext()).merge(
        K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(step_tags))
    )
    job = construct_dagster_k8s_job(
        job_config=DagsterK8sJobConfig(
            job_image="imagegen-pipeline:test", dagster_home="/opt/dagster/dagster_home"
        ),
        args=["dagster", "api", "execute_step"],
        job_name="dagster-step-0123456789abcdef",
        pod_name="dagster-step-0123456789abcdef",
        component="step_worker",
        user_defined_k8s_config=context.run_k8s_config,
        labels={"dagster/op": "gpu_step"},
    )
    # the camelCase manifest the Kubernetes API would receive
    return ApiClient().sanitize_for_serialization(job)


def test_gpu_tags_parse_with_dagster_k8s() -> None:
    tags = _step_tags(gpu_op_tags(1))
    assert tags["dagster-celery/queue"] == "gpu"
    config = get_user_defined_k8s_config(tags)
    assert isinstance(config, UserDefinedDagsterK8sConfig)
    assert config.container_config["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    # whatever else the tag carries must be valid dagster-k8s config (it was validated above)
    assert set(config.pod_spec_config) <= {"node_selector", "tolerations", "affinity"}


@pytest.mark.parametrize("gpus", [1, 2])
def test_step_pod_container_asks_for_the_gpus(gpus: int) -> None:
    tags = _step_tags(gpu_op_tags(gpus))
    manifest = _step_job_manifest(tags)
    assert manifest["kind"] == "Job"
    pod_spec = manifest["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    assert container["image"] == "imagegen-pipeline:test"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": str(gpus)}
    # any placement the tags carry (tolerations, node selector) reaches the pod spec
    placement = get_user_defined_k8s_config(tags).pod_spec_config
    if "tolerations" in placement:
        assert pod_spec["tolerations"] == placement["tolerations"]
    if "node_selector" in placement:
        assert pod_spec["nodeSelector"] == placement["node_selector"]


def test_executor_wide_resources_deep_merge_with_the_gpu_limit() -> None:
    """k8s_job_executor's own ``container_config`` (all steps) and the op's tags are deep-merged
    (merge_behavior DEEP): CPU/memory for every step plus the GPU for GPU steps."""
    executor_context = K8sContainerContext(
        run_k8s_config=UserDefinedDagsterK8sConfig(
            container_config={
                "resources": {
                    "requests": {"cpu": "1", "memory": "4Gi"},
                    "limits": {"memory": "8Gi"},
                }
            }
        )
    )
    manifest = _step_job_manifest(_step_tags(gpu_op_tags(1)), executor_context)
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    assert container["resources"] == {
        "requests": {"cpu": "1", "memory": "4Gi"},
        "limits": {"memory": "8Gi", "nvidia.com/gpu": "1"},
    }


def test_recommended_gpu_node_selector_and_toleration_parse() -> None:
    """What gpu_op_tags would carry to pin GPU steps to GPU nodes: ``pod_spec_config`` beside
    ``container_config`` in the same ``dagster-k8s/config`` tag."""
    tags = gpu_op_tags(1)
    k8s_config = tags["dagster-k8s/config"]
    tags["dagster-k8s/config"] = {
        **k8s_config,
        "pod_spec_config": {**k8s_config.get("pod_spec_config", {}), **GPU_POD_SPEC_CONFIG},
    }
    manifest = _step_job_manifest(_step_tags(tags))
    pod_spec = manifest["spec"]["template"]["spec"]
    assert pod_spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod_spec["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod_spec["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
