"""Everything Dagster loads: the assets, checks, jobs, sensors and resources of each domain."""

import dagster as dg

from imagegen_pipeline.defs.clips.assets import clips
from imagegen_pipeline.defs.comparison.assets import backend_comparison
from imagegen_pipeline.defs.comparison.sensors import comparison_automation_sensor
from imagegen_pipeline.defs.executor import project_executor
from imagegen_pipeline.defs.images.assets import images
from imagegen_pipeline.defs.images.batch_sensor import gemini_batch_sensor
from imagegen_pipeline.defs.images.checks import images_checks
from imagegen_pipeline.defs.images.sensors import (
    bulk_generation_schedule,
    generate_after_prompts_sensor,
)
from imagegen_pipeline.defs.jobs import (
    compare_backends_job,
    generate_images_job,
    prepare_prompts_job,
)
from imagegen_pipeline.defs.keepers.assets import keepers
from imagegen_pipeline.defs.keepers.checks import keepers_checks
from imagegen_pipeline.defs.prompts.assets import enhanced_prompts, prompt_checks, prompts
from imagegen_pipeline.defs.prompts.sensors import prompt_files_sensor
from imagegen_pipeline.defs.quality.assets import quality, video_quality
from imagegen_pipeline.defs.quality.checks import quality_checks
from imagegen_pipeline.defs.resources import default_resources
from imagegen_pipeline.defs.review.jobs import regenerate_images_job
from imagegen_pipeline.defs.review.sensors import (
    regenerate_rejected_sensor,
    score_replacements_sensor,
)

defs = dg.Definitions(
    assets=[
        prompts,
        enhanced_prompts,
        images,
        quality,
        keepers,
        clips,
        video_quality,
        backend_comparison,
    ],
    asset_checks=[prompt_checks, images_checks, quality_checks, keepers_checks],
    jobs=[prepare_prompts_job, generate_images_job, compare_backends_job, regenerate_images_job],
    schedules=[bulk_generation_schedule],
    sensors=[
        prompt_files_sensor,
        generate_after_prompts_sensor,
        comparison_automation_sensor,
        regenerate_rejected_sensor,
        score_replacements_sensor,
        gemini_batch_sensor,
    ],
    resources=default_resources(),
    executor=project_executor(),
)
