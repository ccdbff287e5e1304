"""Prompt CSVs in, validated and enhanced prompts out (one partition per CSV file)."""

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pandas as pd

from imagegen_pipeline.defs.checks import partitioned_check_specs, per_partition
from imagegen_pipeline.defs.gpu import refuse_literal_key
from imagegen_pipeline.defs.metadata import add_partition_metadata, markdown_table
from imagegen_pipeline.defs.model_resources import settings_of
from imagegen_pipeline.defs.partitions import prompt_set_partitions, single_run
from imagegen_pipeline.defs.prompts.resources import PromptEnhancerResource
from imagegen_pipeline.defs.storage import StorageResource
from imagegen_pipeline.enhancement import create_enhancer, enhance_prompts
from imagegen_pipeline.model_settings import EnhancerSettings
from imagegen_pipeline.prompt_csv import (
    REJECTED_COLUMNS,
    VALID_COLUMNS,
    PromptFileError,
    read_prompt_csv,
    source_digest,
)
from imagegen_pipeline.prompt_folder import find_prompt_csvs

# Metadata of each `prompts` partition: the digest of the source it read, so that
# prompt_files_sensor knows a file it has not seen yet was prepared as it is.
SOURCE_DIGEST = "source_digest"


def prompt_csv_files(prompts_dir: str | Path) -> dict[str, Path]:
    """Every usable CSV file of the prompts folder, by prompt-set name (sets that two files
    map to are left out: see ``find_prompt_csvs``)."""
    return find_prompt_csvs(prompts_dir).files


@dg.multi_asset(
    outs={
        "prompts": dg.AssetOut(
            description="Valid rows of one prompt CSV.", kinds={"csv", "pandas"}
        ),
        "rejected_prompts": dg.AssetOut(
            description="Rejected rows of one prompt CSV: file, line, field and reason.",
            kinds={"csv", "pandas"},
        ),
    },
    partitions_def=prompt_set_partitions,
    backfill_policy=single_run,
    group_name="prompts",
    can_subset=False,
)
def prompts(context: dg.AssetExecutionContext, storage: StorageResource) -> Iterator[dg.Output]:
    """Read and validate each prompt CSV of the run; bad rows are set aside with their reasons.

    A file that cannot be used at all (not UTF-8, no ``prompt`` column, no valid row) gives an
    empty ``prompts`` table and its reason in ``rejected_prompts``, so the other files of a
    many-set run go on; the step fails when no file of the run could be used.
    """
    folder = storage.prompts_folder()
    found = find_prompt_csvs(folder)
    files, problems = found.files, found.problems
    valid: dict[str, pd.DataFrame] = {}
    rejected: dict[str, pd.DataFrame] = {}
    unusable: list[str] = []
    for prompt_set in context.partition_keys:
        path = files.get(prompt_set)
        if path is None:
            message = problems.get(prompt_set, f"No CSV file for prompt set {prompt_set!r}")
            message += f" in {folder}/"
            context.log.error(message)
            unusable.append(message)
            valid[prompt_set], rejected[prompt_set] = _no_rows(), _file_problem(folder, message)
            continue
        digest = source_digest(found.paths[prompt_set])  # before reading: a later edit is new
        try:
            table = read_prompt_csv(path)
        except PromptFileError as error:
            context.log.error(str(error))
            unusable.append(str(error))
            problems = pd.concat([error.rejected, _file_problem(path, str(error))])
            valid[prompt_set], rejected[prompt_set] = _no_rows(), problems
            continue
        for problem in table.rejected.to_dict("records"):
            where = f"{problem['file']}, line {problem['line']}, {problem['field']}"
            context.log.warning(f"{where}: {problem['reason']}")
        valid[prompt_set], rejected[prompt_set] = table.valid, table.rejected
        add_partition_metadata(
            context,
            {
                "file": dg.MetadataValue.path(str(path)),
                SOURCE_DIGEST: digest,
                "rows": len(table.valid),
                "rejected_rows": table.rejected_rows,
                "preview": markdown_table(
                    table.valid, ["prompt_id", "prompt", "style", "num_images"]
                ),
            },
            asset_key="prompts",
            partition_key=prompt_set,
        )
    if len(unusable) == len(context.partition_keys):
        raise dg.Failure(description="\n".join(unusable))
    yield dg.Output(valid, "prompts")
    yield dg.Output(rejected, "rejected_prompts")


def _no_rows() -> pd.DataFrame:
    """The valid rows of a file that could not be used: none, with the usual columns."""
    return pd.DataFrame(columns=list(VALID_COLUMNS))


def _file_problem(file: Path, reason: str) -> pd.DataFrame:
    """A rejected-prompts row for a whole file that could not be used (line 0, field "file")."""
    problem = dict.fromkeys(REJECTED_COLUMNS, "") | {
        "file": str(file),
        "line": 0,
        "field": "file",
        "reason": reason,
    }
    return pd.DataFrame([problem], columns=list(REJECTED_COLUMNS))


def all_prompt_rows_valid(rejected_prompts: pd.DataFrame) -> dg.AssetCheckResult:
    """Every row of the CSV was valid (WARN for rejected rows, ERROR for an unusable file)."""
    rejected_lines = int(rejected_prompts["line"].nunique()) if len(rejected_prompts) else 0
    whole_file = bool(len(rejected_prompts)) and rejected_prompts["field"].eq("file").any()
    return dg.AssetCheckResult(
        passed=rejected_lines == 0,
        severity=dg.AssetCheckSeverity.ERROR if whole_file else dg.AssetCheckSeverity.WARN,
        metadata={
            "rejected_rows": rejected_lines,
            "reasons": markdown_table(rejected_prompts, ["line", "field", "reason"]),
        },
    )


PROMPT_CHECKS = {"all_prompt_rows_valid": all_prompt_rows_valid}


@dg.multi_asset_check(
    specs=partitioned_check_specs("rejected_prompts", PROMPT_CHECKS, prompt_set_partitions),
    can_subset=True,
)
def prompt_checks(rejected_prompts: dict[str, pd.DataFrame]):
    """Every check of ``PROMPT_CHECKS`` on each prompt set of the run."""
    yield from per_partition("rejected_prompts", PROMPT_CHECKS, rejected_prompts)


@dg.asset(
    partitions_def=prompt_set_partitions,
    backfill_policy=single_run,
    group_name="prompts",
    kinds={"pandas"},
)
def enhanced_prompts(
    context: dg.AssetExecutionContext,
    prompts: dict[str, pd.DataFrame],
    enhancer: PromptEnhancerResource,
    storage: StorageResource,
) -> dict[str, pd.DataFrame]:
    """Each prompt made detailed for image models, with a rating and token counts."""
    refuse_literal_key(enhancer, "gemini_api_key", "GEMINI_API_KEY")
    tables = {}
    for prompt_set, valid in prompts.items():
        settings = settings_of(enhancer, EnhancerSettings)
        prompt_enhancer = create_enhancer(settings, prompt_set, storage.storage())
        table = enhance_prompts(valid, prompt_enhancer)
        fallbacks = int((table["fallback_reason"] != "").sum()) if len(table) else 0
        if fallbacks:
            context.log.warning(f"{prompt_set}: {fallbacks} prompt(s) fell back to the template.")
        add_partition_metadata(
            context,
            {
                "rows": len(table),
                "method": prompt_enhancer.method,
                "model": prompt_enhancer.model or "n/a",
                "fallbacks": fallbacks,
                "mean_prompt_score": float(table["prompt_score"].mean()) if len(table) else 0.0,
                "clip_truncated": int(table["clip_truncated"].sum()) if len(table) else 0,
                "preview": markdown_table(
                    table, ["prompt_id", "enhanced_prompt", "method", "prompt_score", "clip_tokens"]
                ),
            },
            partition_key=prompt_set,
        )
        tables[prompt_set] = table
    return tables
