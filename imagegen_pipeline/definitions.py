"""Everything Dagster loads: the assets, checks, jobs, sensors and resources of each domain."""

import dagster as dg

from imagegen_pipeline.defs.clips.assets import clips
from imagegen_pipeline.defs.comparison.assets import backend_comparison
from imagegen_pipeline.defs.images.assets import images
from imagegen_pipeline.defs.images.sensors import generate_after_prompts_sensor
from imagegen_pipeline.defs.jobs import (
    compare_backends_job,
    generate_images_job,
    prepare_prompts_job,
)
from imagegen_pipeline.defs.prompts.assets import all_prompt_rows_valid, enhanced_prompts, prompts
from imagegen_pipeline.defs.prompts.sensors import prompt_files_sensor
from imagegen_pipeline.defs.quality.assets import clip_quality, quality
from imagegen_pipeline.defs.quality.checks import quality_checks
from imagegen_pipeline.defs.resources import default_resources

defs = dg.Definitions(
    assets=[prompts, enhanced_prompts, images, quality, clips, clip_quality, backend_comparison],
    asset_checks=[all_prompt_rows_valid, *quality_checks],
    jobs=[prepare_prompts_job, generate_images_job, compare_backends_job],
    sensors=[prompt_files_sensor, generate_after_prompts_sensor],
    resources=default_resources(),
)
