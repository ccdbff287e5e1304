"""Asset checks evaluated per partition, also in runs that cover many partitions.

Dagster 1.13 records an ``AssetCheckResult`` against the run's single partition key, which a
single-run backfill does not have. The project's checks are therefore plain functions from one
partition's table to an ``AssetCheckResult``, and ``per_partition`` turns each into an
evaluation of its own partition. The check ops are declared with ``can_subset=True`` so that they
may emit these evaluations instead of one result per check.
"""

import warnings
from collections.abc import Callable, Iterator, Mapping

import dagster as dg
import pandas as pd

from imagegen_pipeline.defs.metadata import markdown_table
from imagegen_pipeline.defs.partitions import prompt_set_x_backend_partitions

CheckFunction = Callable[[pd.DataFrame], dg.AssetCheckResult]


def partitioned_check_specs(
    asset: str,
    checks: Mapping[str, CheckFunction],
    partitions_def: dg.PartitionsDefinition = prompt_set_x_backend_partitions,
) -> list[dg.AssetCheckSpec]:
    """One check spec per function of ``checks``, partitioned like ``asset``, described by
    the function's docstring."""
    # Partitioned checks are marked preview in Dagster 1.13; without them a check could not
    # report on its own partition.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return [
            dg.AssetCheckSpec(
                name, asset=asset, partitions_def=partitions_def, description=check.__doc__
            )
            for name, check in checks.items()
        ]


def per_partition(
    asset: str,
    checks: Mapping[str, CheckFunction],
    tables: Mapping[str, pd.DataFrame],
) -> Iterator[dg.AssetCheckEvaluation]:
    """Every check of ``checks`` (by name) on every partition's table of ``asset``."""
    for partition, table in tables.items():
        for name, check in checks.items():
            result = check(table)
            yield dg.AssetCheckEvaluation(
                asset_key=dg.AssetKey(asset),
                check_name=name,
                passed=result.passed,
                severity=result.severity,
                metadata=result.metadata,
                description=result.description,
                partition=str(partition),
            )


def every_prompt_has(
    table: pd.DataFrame, wanted: pd.DataFrame, what: str, columns: list[str]
) -> dg.AssetCheckResult:
    """ERROR when a prompt of ``table`` has no row in ``wanted`` (its rows that count): the
    metadata counts them as ``prompts_without_<what>`` and lists their rows' ``columns``."""
    prompts = set(table["prompt_id"]) if len(table) else set()
    missing = sorted(prompts - (set(wanted["prompt_id"]) if len(wanted) else set()))
    rows = table[table["prompt_id"].isin(missing)] if missing else table.head(0)
    return dg.AssetCheckResult(
        passed=not missing,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "prompts": len(prompts),
            f"prompts_without_{what}": len(missing),
            "missing": markdown_table(rows, columns),
        },
    )
