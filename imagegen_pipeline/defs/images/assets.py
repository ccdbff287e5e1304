"""Images of each prompt set from each backend, with one run-metadata row per image.

``images`` is a graph-backed asset of two ops so that a hosted API's partitions never hold a
slot of the ``gpu`` pool while they wait on the network: ``generate_with_apis`` (no pool) makes
the Gemini images of the run's partitions, then ``generate_on_gpu`` (``gpu`` pool) makes the
local backends' images and assembles every partition's table. Both handle all the partition
keys of their run (a single-run backfill), loading each model once.
"""

from typing import Any

import dagster as dg
import pandas as pd

from imagegen_pipeline.defs.gpu import GPU_POOL, gpu_op_tags, model_for_step
from imagegen_pipeline.defs.images.routing import images_kind, route, set_settings
from imagegen_pipeline.defs.metadata import add_partition_metadata, markdown_table, thumbnails
from imagegen_pipeline.defs.partitions import (
    PROMPT_SET_INPUT,
    prompt_set_x_backend_partitions,
    prompts_of,
    single_run,
)
from imagegen_pipeline.defs.scorers import SCORER_RESOURCE_KEYS, scorer_handles
from imagegen_pipeline.defs.step_records import (
    PartitionStep,
    each_partition,
    generation_step_record,
)
from imagegen_pipeline.project_config import load_project_config
from imagegen_pipeline.records import EXISTING_STATUSES, IMAGE_STATUSES, ImageRecord
from imagegen_pipeline.registry import IMAGE_BACKENDS, backend_spec
from imagegen_pipeline.steps.best_of_n import (
    default_scorer_name,
    policies_of,
    run_candidates_step,
    scorers_needed,
    scorers_to_place,
)
from imagegen_pipeline.steps.hybrid import Routing
from imagegen_pipeline.steps.images import ImagesStepContext, images_folder
from imagegen_pipeline.steps.regenerate import standing_replacements

PREVIEW_COLUMNS = ["prompt_id", "image_index", "status", "seed", "seconds", "error"]
API_BACKENDS = frozenset(spec.name for spec in IMAGE_BACKENDS if not spec.is_local)
LOCAL_BACKENDS = frozenset(spec.name for spec in IMAGE_BACKENDS if spec.is_local)
IMAGE_COLUMNS = list(ImageRecord.__dataclass_fields__)

# What one op hands on: per partition key, its table and its materialization metadata.
PartitionResults = dict[str, tuple[pd.DataFrame, dict[str, Any]]]


def make_images(
    context: dg.AssetExecutionContext,
    enhanced_prompts: dict[str, pd.DataFrame],
    backends: frozenset[str],
) -> PartitionResults:
    """Generate the images of the run's partitions whose backend is in ``backends``."""
    storage_resource = context.resources.storage
    storage = storage_resource.storage()
    project = load_project_config()

    def step(warm: Any, key: str, prompt_set: str, backend_name: str) -> PartitionStep:
        spec = backend_spec(backend_name)
        settings = set_settings(context, warm, backend_name, prompt_set)
        same = settings == warm.settings
        target = settings.image_target(backend_name, warm.model_id if same else settings.model)
        prompts = prompts_of(enhanced_prompts, prompt_set, context.log.warning)
        prompts, routing = route(context, prompts, prompt_set, context.log.info)
        default_scorer = default_scorer_name(project)
        policies = policies_of(prompts, backend_name, default_scorer)
        gated = scorers_needed(policies, True)
        # Replacements of rejected images, listed again beside the CSV's (see steps/regenerate).
        replacements = standing_replacements(storage, prompt_set, backend_name, target)
        # A set whose sidecar changes a hosted model's settings gets its own model object.
        per_set: list[Any] = []

        def model() -> Any:
            if same:
                return warm.model
            if not per_set:
                per_set.append(spec.implementation_class()(settings))
            return per_set[0]

        where = ImagesStepContext(
            storage=storage,
            prompt_set=prompt_set,
            run_id=context.run.run_id,
            png_compress_level=storage_resource.png_compress_level,
            writer_threads=storage_resource.writer_threads,
            verify=storage_resource.verify,
        )
        kind = images_kind(settings)
        # Best-of-N: candidates in rounds, scored here where a gate needs it, or where the
        # ranking scorer fits beside the generator.
        with scorer_handles(context, gated | scorers_to_place(policies), project) as scorers:
            best_of_n = run_candidates_step(
                target,
                model,
                prompts,
                where,
                scorers,
                default_scorer=default_scorer,
                backend_settings=settings,
                extra=replacements,
                log=context.log.info,
                kind=kind,
            )
        outcome = best_of_n.outcome
        summary = best_of_n.summary
        for warning in summary.warnings:
            context.log.warning(warning)
        counts = outcome.counts
        record = generation_step_record(
            context,
            "images",
            prompt_set,
            backend_name,
            target.settings,
            warm.device,
            outcome,
            is_local=spec.is_local,
            items_per_second=_rate(counts.get("ok", 0), outcome.records),
            offload=summary.metadata.get("offload"),
            batch_size=summary.metadata.get("batch_size"),
            memory_plan=summary.metadata.get("memory_plan"),
            adapter_loads=summary.metadata.get("adapter_loads", 0),
            adapter_switches=summary.metadata.get("adapter_switches", 0),
            adapter_load_seconds=summary.metadata.get("adapter_load_seconds", 0.0),
            adapter_switch_seconds=summary.metadata.get("adapter_switch_seconds", 0.0),
            controlnet_loads=summary.metadata.get("controlnet_loads", 0),
            controlnet_load_seconds=summary.metadata.get("controlnet_load_seconds", 0.0),
            compile_mode=summary.metadata.get("compile_mode"),
            compile_seconds=summary.metadata.get("compile_seconds", 0.0),
            recompiles=summary.metadata.get("recompiles", 0),
            peak_gpu_memory_mb=_max(r.peak_gpu_memory_mb for r in outcome.records),
            cost_usd=_sum(r.cost_usd for r in outcome.records),
            pending=counts.get("pending", 0),
            **hybrid_split(routing, prompts, backend_name),
        )
        table = pd.DataFrame([r.__dict__ for r in outcome.records], columns=IMAGE_COLUMNS)
        failures = counts.get("failed", 0) + counts.get("blocked", 0)
        if failures:
            first = next((r.error for r in outcome.records if r.error), "")
            context.log.warning(
                f"{prompt_set}/{backend_name}: {failures} of {len(outcome.records)} image(s) "
                f"failed or were blocked; first error: {first}"
            )
        metadata = {
            "rows": len(table),
            **{status: counts.get(status, 0) for status in IMAGE_STATUSES},
            "damaged": len(outcome.damaged),
            **{k: v for k, v in summary.metadata.items() if v is not None},
            "model_id": target.settings.model_id,
            **({"device": record.device} if record.device else {}),
            "worker": record.worker,
            "seconds": round(outcome.seconds, 3),
            "model_loads": record.model_loads,
            "model_cache_hits": record.model_cache_hits,
            "model_load_seconds": round(record.model_load_seconds, 3),
            "images_per_second": float(record.items_per_second or 0.0),
            "candidate_rounds": best_of_n.rounds,
            "gate_retries": best_of_n.gate_retries,
            "scored_in_step": best_of_n.scored_in_step,
            "scoring_seconds": round(best_of_n.scoring_seconds, 3),
            **({"scorer_placement": best_of_n.placements} if best_of_n.placements else {}),
            "cost_usd": float(record.cost_usd or 0.0),
            **({"mode": settings.mode} if hasattr(settings, "mode") else {}),
            **{k: v for k, v in hybrid_split(routing, prompts, backend_name).items()},
            "preview": markdown_table(table, PREVIEW_COLUMNS),
            "images_dir": dg.MetadataValue.path(
                str(images_folder(storage, prompt_set, backend_name))
            ),
        }
        return PartitionStep(table, record, counts, metadata)

    def model(backend_name: str) -> Any:
        return model_for_step(context, backend_spec(backend_name), project)

    done = each_partition(context, "images", step, model, backends)
    return {key: (result.table, result.metadata) for key, result in done.items()}


def hybrid_split(routing: Routing | None, prompts: pd.DataFrame, backend: str) -> dict[str, Any]:
    """The step row's hybrid figures of a set with ``any`` rows (none for other sets)."""
    if routing is None:
        return {}
    return {
        "hybrid_local_images": routing.images(prompts, routing.local_backend),
        "hybrid_overflow_images": routing.images(prompts, routing.overflow_backend),
        "hybrid_queue_seconds": routing.queue_seconds,
    }


def _rate(generated: int, records: list[ImageRecord]) -> float | None:
    seconds = sum(r.seconds or 0.0 for r in records if r.status == "ok")
    return generated / seconds if seconds else None


def _max(values: Any) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _sum(values: Any) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


# The ops of a graph-backed asset load their inputs with their own definitions: a prompt set
# without enhanced prompts is allowed to be missing here too (see PROMPT_SET_INPUT).
ENHANCED_PROMPTS_IN = dg.In(metadata=PROMPT_SET_INPUT.metadata)


@dg.op(
    ins={"enhanced_prompts": ENHANCED_PROMPTS_IN},
    required_resource_keys={"storage", *API_BACKENDS, *SCORER_RESOURCE_KEYS},
    out=dg.Out(io_manager_key="step_io_manager"),
)
def generate_with_apis(
    context: dg.AssetExecutionContext, enhanced_prompts: dict[str, pd.DataFrame]
) -> PartitionResults:
    """Images from hosted APIs (Gemini) for the run's partitions; holds no GPU slot."""
    return make_images(context, enhanced_prompts, API_BACKENDS)


@dg.op(
    ins={"enhanced_prompts": ENHANCED_PROMPTS_IN, "api_images": dg.In()},
    # The hosted backends' resources too: their settings route rows with backends "any".
    required_resource_keys={"storage", *LOCAL_BACKENDS, *API_BACKENDS, *SCORER_RESOURCE_KEYS},
    pool=GPU_POOL,
    tags=gpu_op_tags(),
)
def generate_on_gpu(
    context: dg.AssetExecutionContext,
    enhanced_prompts: dict[str, pd.DataFrame],
    api_images: PartitionResults,
) -> dict[str, pd.DataFrame]:
    """Images from the local models, then every partition's table and metadata."""
    results = {**api_images, **make_images(context, enhanced_prompts, LOCAL_BACKENDS)}
    storage = context.resources.storage.storage()
    planned = existing = 0
    for key, (table, metadata) in results.items():
        paths = list(table.loc[table["status"].isin(EXISTING_STATUSES), "path"].dropna())
        planned += len(table)
        existing += len(paths)
        metadata["thumbnails"] = thumbnails(paths, storage.read_bytes)
        add_partition_metadata(context, metadata, asset_key="images", partition_key=key)
    pending = sum(int((table["status"] == "pending").sum()) for table, _ in results.values())
    if planned and not existing and not pending:  # a batch still running is not a failure
        tables = [table for table, _ in results.values()]
        first = next((e for t in tables for e in t["error"] if e), "n/a")
        raise dg.Failure(
            f"No image of this run succeeded ({planned} planned). First error: {first}"
        )
    return {key: table for key, (table, _) in results.items()}


@dg.graph_asset(
    partitions_def=prompt_set_x_backend_partitions,
    ins={"enhanced_prompts": PROMPT_SET_INPUT},
    backfill_policy=single_run,
    group_name="images",
    kinds={"pytorch", "huggingface", "parquet"},
)
def images(enhanced_prompts: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Every image of each prompt set the backend lacks, as PNGs; this table has one row per
    image (status, path, seed, seconds, cost).

    Best-of-N rows draw their candidates here, in rounds behind their gate (``min_score``).
    Outputs are content-addressed, so a re-run generates only what is missing. One failed
    prompt fails alone: the ``every_image_generated`` check reports it.
    """
    return generate_on_gpu(enhanced_prompts, generate_with_apis(enhanced_prompts))
