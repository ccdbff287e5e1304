"""The sensor that keeps every prompt set's comparison fresh, running from the first start.

``backend_comparison`` declares when it should refresh (its automation condition); Dagster's
automation sensor is what evaluates that, and it is off by default unless declared, so it is
declared here, running by default, for this asset only.
"""

import dagster as dg

from imagegen_pipeline.project_config import load_project_config

comparison_automation_sensor = dg.AutomationConditionSensorDefinition(
    "comparison_automation_sensor",
    target=dg.AssetSelection.assets("backend_comparison"),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=load_project_config().sensor_interval_seconds,
)
