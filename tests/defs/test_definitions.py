"""The Definitions load, and every asset, check, job, sensor and resource resolves."""

import dagster as dg

from imagegen_pipeline.definitions import defs
from imagegen_pipeline.defs.gpu import GPU_POOL


def test_every_job_resolves():
    for job_name in ("prepare_prompts", "generate_images", "compare_backends", "__ASSET_JOB"):
        assert defs.resolve_job_def(job_name) is not None


def test_assets_and_resources_resolve():
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.materializable_asset_keys}
    assert {"prompts", "rejected_prompts", "enhanced_prompts", "images"} <= keys
    resources = defs.get_repository_def().get_top_level_resources()
    expected = {"storage", "io_manager", "enhancer", "flux_schnell", "sdxl_turbo", "gemini"}
    assert expected | {"svd", "clip_scorer", "quality_thresholds"} <= set(resources)
    for sensor in ("prompt_files_sensor", "generate_after_prompts_sensor"):
        assert defs.resolve_sensor_def(sensor).default_status == dg.DefaultSensorStatus.RUNNING


def test_gpu_steps_carry_the_pool_and_executor_tags():
    images = defs.resolve_assets_def("images")
    assert images.op.pool == GPU_POOL
    tags = images.op.tags
    assert tags["dagster-celery/queue"] == "gpu"
    assert '"nvidia.com/gpu": "1"' in tags["dagster-k8s/config"]


def test_images_read_enhanced_prompts_of_their_own_prompt_set():
    graph = defs.resolve_asset_graph()
    images = graph.get(dg.AssetKey("images"))
    assert dg.AssetKey("enhanced_prompts") in images.parent_keys
