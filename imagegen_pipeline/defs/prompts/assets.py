"""Prompt CSVs in, validated and enhanced prompts out (one partition per CSV file)."""

from pathlib import Path

import dagster as dg
import pandas as pd

from imagegen_pipeline.defs.metadata import markdown_table
from imagegen_pipeline.defs.partitions import prompt_set_partitions
from imagegen_pipeline.defs.prompts.resources import PromptEnhancerResource
from imagegen_pipeline.defs.storage import StorageResource
from imagegen_pipeline.enhancement import enhance_prompts
from imagegen_pipeline.prompt_csv import PromptFileError, prompt_set_name, read_prompt_csv


def prompt_csv_files(prompts_dir: str | Path) -> dict[str, Path]:
    """Every CSV file of the prompts folder, by prompt-set name."""
    folder = Path(prompts_dir)
    files = sorted(folder.glob("*.csv")) + sorted(folder.glob("*.CSV"))
    return {prompt_set_name(path): path for path in files}


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
    group_name="prompts",
    can_subset=False,
)
def prompts(context: dg.AssetExecutionContext, storage: StorageResource):
    """Read and validate one prompt CSV; bad rows are set aside with their reasons."""
    prompt_set = context.partition_key
    path = prompt_csv_files(storage.prompts_dir).get(prompt_set)
    if path is None:
        raise dg.Failure(f"No CSV file for prompt set {prompt_set!r} in {storage.prompts_dir}/")
    try:
        table = read_prompt_csv(path)
    except PromptFileError as error:
        yield dg.Output(error.rejected, "rejected_prompts", metadata={"rows": len(error.rejected)})
        raise dg.Failure(description=str(error)) from None
    for problem in table.rejected.to_dict("records"):
        context.log.warning(
            f"{problem['file']}, line {problem['line']}, {problem['field']}: {problem['reason']}"
        )
    yield dg.Output(
        table.valid,
        "prompts",
        metadata={
            "file": dg.MetadataValue.path(str(path)),
            "rows": len(table.valid),
            "rejected_rows": table.rejected_rows,
            "preview": markdown_table(table.valid, ["prompt_id", "prompt", "style", "num_images"]),
        },
    )
    yield dg.Output(
        table.rejected,
        "rejected_prompts",
        metadata={
            "rows": table.rejected_rows,
            "problems": len(table.rejected),
            "preview": markdown_table(table.rejected, ["line", "field", "reason", "value"]),
        },
    )


@dg.asset_check(asset="rejected_prompts", description="Every row of the CSV was valid.")
def all_prompt_rows_valid(rejected_prompts: pd.DataFrame) -> dg.AssetCheckResult:
    """WARN when rows were rejected, listing the first reasons."""
    rejected_lines = int(rejected_prompts["line"].nunique()) if len(rejected_prompts) else 0
    return dg.AssetCheckResult(
        passed=rejected_lines == 0,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "rejected_rows": rejected_lines,
            "reasons": markdown_table(rejected_prompts, ["line", "field", "reason"]),
        },
    )


@dg.asset(
    partitions_def=prompt_set_partitions,
    group_name="prompts",
    kinds={"pandas"},
)
def enhanced_prompts(
    context: dg.AssetExecutionContext,
    prompts: pd.DataFrame,
    enhancer: PromptEnhancerResource,
    storage: StorageResource,
) -> dg.Output[pd.DataFrame]:
    """Each prompt made detailed for image models, with a quality score and token counts."""
    prompt_enhancer = enhancer.create_enhancer(
        context.partition_key, cache_dir=storage.base / "cache" / "enhancements"
    )
    table = enhance_prompts(prompts, prompt_enhancer)
    fallbacks = int((table["fallback_reason"] != "").sum())
    if fallbacks:
        context.log.warning(f"{fallbacks} prompt(s) fell back to the template enhancer.")
    return dg.Output(
        table,
        metadata={
            "rows": len(table),
            "method": prompt_enhancer.method,
            "model": prompt_enhancer.model or "n/a",
            "fallbacks": fallbacks,
            "mean_quality_score": float(table["quality_score"].mean()),
            "clip_truncated": int(table["clip_truncated"].sum()),
            "preview": markdown_table(
                table, ["prompt_id", "enhanced_prompt", "method", "quality_score", "clip_tokens"]
            ),
        },
    )
