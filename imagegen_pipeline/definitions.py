"""Everything Dagster loads: the assets, checks, jobs, sensors and resources of each domain."""

import dagster as dg

from imagegen_pipeline.defs.images.assets import images
from imagegen_pipeline.defs.images.sensors import generate_after_prompts_sensor
from imagegen_pipeline.defs.jobs import generate_images_job, prepare_prompts_job
from imagegen_pipeline.defs.prompts.assets import all_prompt_rows_valid, enhanced_prompts, prompts
from imagegen_pipeline.defs.prompts.sensors import prompt_files_sensor
from imagegen_pipeline.defs.resources import default_resources

defs = dg.Definitions(
    assets=[prompts, enhanced_prompts, images],
    asset_checks=[all_prompt_rows_valid],
    jobs=[prepare_prompts_job, generate_images_job],
    sensors=[prompt_files_sensor, generate_after_prompts_sensor],
    resources=default_resources(),
)
