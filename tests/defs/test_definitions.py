"""The Definitions load, and every asset, check, job, sensor, schedule and resource resolves."""

import subprocess
import sys

import dagster as dg

from imagegen_pipeline.definitions import defs
from imagegen_pipeline.defs.gpu import GPU_POOL
from imagegen_pipeline.registry import BACKEND_NAMES, MODELS


def test_every_job_resolves():
    for job_name in ("prepare_prompts", "generate_images", "compare_backends", "__ASSET_JOB"):
        assert defs.resolve_job_def(job_name) is not None


def test_assets_and_resources_resolve():
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.materializable_asset_keys}
    assert keys == {
        "prompts",
        "rejected_prompts",
        "enhanced_prompts",
        "images",
        "quality",
        "keepers",
        "clips",
        "video_quality",
        "backend_comparison",
    }
    resources = defs.get_repository_def().get_top_level_resources()
    expected = {"storage", "io_manager", "step_io_manager", "enhancer", "quality_thresholds"}
    assert expected | set(MODELS) <= set(resources)
    for sensor in (
        "prompt_files_sensor",
        "generate_after_prompts_sensor",
        "comparison_automation_sensor",
    ):
        assert defs.resolve_sensor_def(sensor).default_status == dg.DefaultSensorStatus.RUNNING
    schedule = defs.resolve_schedule_def("bulk_generation_schedule")
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED


def test_every_backend_is_a_partition_and_every_asset_runs_as_one_run():
    images = defs.resolve_assets_def("images")
    backends = images.partitions_def.get_partitions_def_for_dimension("backend")
    assert backends.get_partition_keys() == list(BACKEND_NAMES)
    for key in defs.resolve_asset_graph().materializable_asset_keys:
        policy = defs.resolve_assets_def(key).backfill_policy
        assert policy is not None and policy.max_partitions_per_run is None, key


def test_gpu_steps_carry_the_pool_and_executor_tags_and_api_steps_do_not():
    ops = {node.name: node.definition for node in defs.resolve_assets_def("images").node_def.nodes}
    gpu_op, api_op = ops["generate_on_gpu"], ops["generate_with_apis"]
    assert gpu_op.pool == GPU_POOL and api_op.pool is None
    assert gpu_op.tags["dagster-celery/queue"] == "gpu"
    assert "dagster-celery/queue" not in api_op.tags
    for asset in ("quality", "clips", "video_quality"):
        op = defs.resolve_assets_def(asset).op
        assert op.pool == GPU_POOL and '"nvidia.com/gpu": "1"' in op.tags["dagster-k8s/config"]
    for asset in ("prompts", "enhanced_prompts", "backend_comparison"):
        assert defs.resolve_assets_def(asset).op.pool is None


def test_images_read_enhanced_prompts_of_their_own_prompt_set():
    graph = defs.resolve_asset_graph()
    images = graph.get(dg.AssetKey("images"))
    assert dg.AssetKey("enhanced_prompts") in images.parent_keys


def test_loading_the_definitions_imports_no_model_library():
    # A run with nothing to do must not pay for torch: the code location, every run worker
    # and every step process import the definitions.
    code = (
        "import sys, imagegen_pipeline.definitions\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'open_clip') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
