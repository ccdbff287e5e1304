"""What every step records: statuses, one dataclass per kind of row, and its Arrow schema.

Each row's columns are declared once, as dataclass fields; the Arrow schema of its run-metadata
table is derived from them, so the Parquet files, the asset tables and the code that fills them
cannot disagree about a column.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, get_args

import pyarrow as pa

# The columns of a validated prompt table, in order (prompt_csv.PromptRow and the CSV line).
PROMPT_COLUMNS = (
    "prompt_id",
    "line",
    "prompt",
    "style",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "num_images",
    "backends",
    "lora",
    "control_image",
    "control_type",
    "control_scale",
    "candidates",
    "select",
    "scorer",
    "min_score",
    "prompt_truncated_by_encoders",
)


# "damaged": a file found but not trusted (size, decoding or sha256 against its row), moved to
# the quarantine; the run metadata keeps that row, the output is made again.
# "pending": in a Gemini batch job that has not finished yet; a later run collects it.
ImageStatus = Literal[
    "ok", "failed", "blocked", "skipped_budget", "skipped_existing", "damaged", "pending"
]
VideoClipStatus = Literal["ok", "failed", "skipped_existing", "damaged"]
IMAGE_STATUSES: tuple[str, ...] = get_args(ImageStatus)
VIDEO_CLIP_STATUSES: tuple[str, ...] = get_args(VideoClipStatus)
# Rows whose output file exists: made by this run, or found from an earlier one.
EXISTING_STATUSES = ("ok", "skipped_existing")


def utc_now() -> datetime:
    """The current time, timezone-aware, as stored in every timestamp column."""
    return datetime.now(UTC)


@dataclass
class ImageRecord:
    """One image of one prompt, as one run saw it."""

    run_id: str  # the run that made the image (or, for skipped_existing, that found it)
    prompt_set: str
    backend: str
    image_id: str  # content address: sha256 of everything that makes the pixels
    prompt_id: str
    image_index: int
    prompt: str
    negative_prompt: str
    model_id: str
    revision: str
    seed: int
    width: int
    height: int
    steps: int
    guidance: float
    status: str  # ImageStatus
    loras: str = ""  # JSON list of the LoRA adapters applied: source, file sha256, scale
    control: str = ""  # JSON: control image, its sha256, type and scale; the map beside the PNG
    error: str = ""
    path: str | None = None
    sha256: str | None = None  # of the PNG file's bytes
    bytes: int | None = None  # the file's size: a re-run spots a file replaced under its name
    seconds: float | None = None  # device time of this image (its share of the batch)
    device: str | None = None
    batch_size: int | None = None
    peak_gpu_memory_mb: float | None = None
    finish_reason: str | None = None
    retries: int | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: float | None = None
    recovered: bool = False  # rebuilt from the PNG's own record after a run was killed
    damage: str | None = None  # why the earlier file of this image was moved to the quarantine
    started_at: datetime | None = None
    finished_at: datetime | None = None
    # Kept by the run metadata, not by the step: a unique id and when the row was appended;
    # superseded_by is the row_id of the later row of the same output that replaced this one.
    row_id: str | None = None
    recorded_at: datetime | None = None
    superseded_by: str | None = None
    replaces: str | None = None  # the image_id of the rejected image this one was made to replace


@dataclass
class VideoClipRecord:
    """One Stable Video Diffusion clip of one image, as one run saw it."""

    run_id: str
    prompt_set: str
    backend: str  # the image backend whose picture the clip animates
    clip_id: str  # content address of the clip
    source_image_id: str
    source_path: str
    prompt_id: str
    image_index: int
    model_id: str
    revision: str
    seed: int
    width: int
    height: int
    frames: int
    fps: int
    steps: int
    motion_bucket_id: int
    noise_aug_strength: float
    status: str  # VideoClipStatus
    error: str = ""
    memory_fallback: str | None = None  # what an out-of-memory retry took, if anything
    path: str | None = None
    preview_path: str | None = None
    sha256: str | None = None  # of the MP4 file's bytes
    bytes: int | None = None  # the MP4's size
    seconds: float | None = None
    device: str | None = None
    peak_gpu_memory_mb: float | None = None
    recovered: bool = False
    damage: str | None = None  # why the earlier file of this clip was moved to the quarantine
    started_at: datetime | None = None
    finished_at: datetime | None = None
    # Kept by the run metadata, not by the step: a unique id and when the row was appended;
    # superseded_by is the row_id of the later row of the same output that replaced this one.
    row_id: str | None = None
    recorded_at: datetime | None = None
    superseded_by: str | None = None


@dataclass
class StepRecord:
    """One step of one partition: counts, time, model loads and memory choices."""

    run_id: str
    asset: str  # images, clips, quality, clip_quality
    prompt_set: str
    backend: str
    model_id: str | None
    revision: str | None
    device: str | None
    worker: str  # the process that ran the step: host:pid, or the celery worker's name
    requested: int = 0
    generated: int = 0  # made (or scored) by this step
    skipped_existing: int = 0
    failed: int = 0
    blocked: int = 0
    skipped_budget: int = 0
    seconds: float = 0.0
    items_per_second: float | None = None
    model_loads: int = 0
    model_cache_hits: int = 0
    model_load_seconds: float = 0.0
    offload: str | None = None
    batch_size: int | None = None
    memory_plan: str | None = None  # why that offload and batch size were chosen
    adapter_loads: int = 0  # LoRA files loaded onto the warm base model
    adapter_switches: int = 0  # changes of the active adapter set
    adapter_load_seconds: float = 0.0  # reading LoRA files into the pipeline, once per file
    adapter_switch_seconds: float = 0.0  # changing the active set between loaded adapters
    controlnet_loads: int = 0  # ControlNets loaded beside the warm base model (once per type)
    controlnet_load_seconds: float = 0.0
    compile_mode: str | None = None  # the denoiser's: off, regional, full (local backends)
    compile_seconds: float = 0.0  # torch.compile during this step (the first step pays it)
    recompiles: int = 0  # graphs compiled again after the compiled model's first call
    peak_gpu_memory_mb: float | None = None
    cost_usd: float | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    row_id: str | None = None  # set by the run metadata, like the rows of images and clips
    recorded_at: datetime | None = None
    # Hybrid overflow (rows with backends "any"): how many images of the set went to the local
    # backend and to Gemini, the local queue estimate that decided it, and Gemini's share of
    # the cost. Set on the step rows of both partitions of such a set.
    hybrid_local_images: int | None = None
    hybrid_overflow_images: int | None = None
    hybrid_queue_seconds: float | None = None
    pending: int = 0  # images waiting in a Gemini batch job, collected by a later run


@dataclass
class BatchJobRecord:
    """One Gemini batch job of one partition, as the runs that submitted, watched and
    collected it saw it. Written before anyone waits on it, so a killed run's successor
    resumes the same job instead of paying for a second one."""

    run_id: str
    prompt_set: str
    backend: str
    display_name: str  # derived from the job's image keys: its id in this table
    status: str  # submitting, open, collected, cancelled, failed
    model_id: str
    job_name: str = ""  # batches/...
    state: str = ""  # the API's last JOB_STATE_*
    attempt: int = 0  # 0: first submission; 1: the follow-up batch of failed keys
    requests: int = 0
    keys: str = ""  # JSON list of the image content addresses, one per request line
    input_file: str = ""
    result_file: str = ""
    ok: int = 0
    blocked: int = 0
    failed: int = 0
    cost_usd: float | None = None
    error: str = ""
    created_at: datetime | None = None
    deadline_at: datetime | None = None
    finished_at: datetime | None = None
    row_id: str | None = None
    recorded_at: datetime | None = None
    superseded_by: str | None = None


def facts_from_json(facts: dict[str, Any]) -> dict[str, Any]:
    """Generation facts read back from a file's embedded JSON, timestamps parsed again."""
    parsed = dict(facts)
    for moment in ("started_at", "finished_at"):
        parsed[moment] = datetime.fromisoformat(parsed[moment]) if parsed.get(moment) else None
    return parsed


_TIMESTAMP = pa.timestamp("us", tz="UTC")
_ARROW_TYPES: dict[Any, pa.DataType] = {
    str: pa.string(),
    int: pa.int64(),
    float: pa.float64(),
    bool: pa.bool_(),
    datetime: _TIMESTAMP,
}


def _arrow_type(annotation: Any) -> pa.DataType:
    # "str | None" and friends: the Arrow column is nullable anyway, so only the base type counts.
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (base,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _ARROW_TYPES[base]
    return _ARROW_TYPES[annotation]


def arrow_schema(record_type: type) -> pa.Schema:
    """The Arrow schema of a record dataclass: one column per field, in field order."""
    hints = typing.get_type_hints(record_type)
    return pa.schema(
        [(f.name, _arrow_type(hints[f.name])) for f in dataclasses.fields(record_type)]
    )


RECORD_TYPES: dict[str, type] = {
    "images": ImageRecord,
    "clips": VideoClipRecord,
    "steps": StepRecord,
    "batch_jobs": BatchJobRecord,
}
TABLE_SCHEMAS: dict[str, pa.Schema] = {name: arrow_schema(t) for name, t in RECORD_TYPES.items()}


def to_arrow(records: list[Any], table: str) -> pa.Table:
    """Records of one table as an Arrow table with that table's schema."""
    schema = TABLE_SCHEMAS[table]
    rows = [dataclasses.asdict(record) for record in records]
    return pa.Table.from_pylist(rows, schema=schema)
