"""One ``clips`` step of one partition, Dagster-free: choose source images, skip finished video
clips, make the rest (on the same skeleton as the images step).

Video clips are content-addressed like images: a clip's file name carries the sha256 of its
source image's bytes and id, the SVD model and revision, size, frames, steps, fps, motion bucket,
noise augmentation, guidance and seed, so a re-run finds finished clips by name.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import pandas as pd
from PIL import Image
from upath import UPath

from imagegen_pipeline.claims import partition_claim
from imagegen_pipeline.records import (
    EXISTING_STATUSES,
    VideoClipRecord,
    facts_from_json,
    utc_now,
)
from imagegen_pipeline.run_metadata import FinishedOutputs, RunMetadataWriter, finished_outputs
from imagegen_pipeline.steps.images import ADDRESS_CHARS
from imagegen_pipeline.steps.skeleton import (
    DEFAULT_WRITER_THREADS,
    StepOutcome,
    run_generation_step,
)
from imagegen_pipeline.storage import Storage
from imagegen_pipeline.video.video_clip import (
    VideoClipResult,
    VideoClipSettings,
    video_clip_address,
    video_clip_seed,
)
from imagegen_pipeline.video.video_files import mp4_bytes, read_preview_facts, webp_preview_bytes

if TYPE_CHECKING:
    from imagegen_pipeline.video.svd import SvdGenerator

Selection = Literal["all", "first_n", "top_n"]


@dataclass(frozen=True)
class PlannedVideoClip:
    """A clip the step is asked for: its source image, seed, content address and files."""

    source_image_id: str
    source_path: str
    source_sha256: str
    prompt_id: str
    image_index: int
    seed: int
    clip_id: str
    stem: str  # "<prompt_id>/<index>_<address>" under the partition's clips folder


def select_sources(
    images: pd.DataFrame, selection: Selection, n: int, score_column: str = "clip_score"
) -> pd.DataFrame:
    """The images to animate: all, or per prompt the first ``n`` or the ``n`` best by score.

    Only images that exist (and were scored, in a quality table) are candidates; blank ones
    (``is_blank``) never are.
    """
    if images.empty:
        return images
    usable = images[images["status"].isin(EXISTING_STATUSES)]
    if "scored" in usable.columns:
        usable = usable[usable["scored"].astype(bool)]
    if "is_blank" in usable.columns:
        usable = usable[~usable["is_blank"].eq(True)]
    if selection == "all":
        return usable.sort_values(["prompt_id", "image_index"]).reset_index(drop=True)
    if selection == "first_n":
        ordered = usable.sort_values(["prompt_id", "image_index"])
    elif selection == "top_n":
        if score_column not in usable.columns:
            raise ValueError(f"top_n needs a {score_column!r} column")
        # Best first; unscored images last, then by index so ties are stable.
        ordered = usable.sort_values(
            ["prompt_id", score_column, "image_index"],
            ascending=[True, False, True],
            na_position="last",
        )
    else:
        raise ValueError(f"unknown selection {selection!r}; use all, first_n or top_n")
    return ordered.groupby("prompt_id", sort=True).head(n).reset_index(drop=True)


def clips_folder(storage: Storage, prompt_set: str, backend: str) -> UPath:
    """The folder of one partition's video clips."""
    return storage.path("clips", prompt_set, backend)


def plan_video_clips(
    sources: pd.DataFrame, settings: VideoClipSettings, storage: Storage
) -> list[PlannedVideoClip]:
    """One planned clip per source image row (``settings``: the generator's, or
    ``video_clip_settings`` before any generator exists)."""
    planned = []
    for row in sources.to_dict("records"):
        recorded = row.get("sha256")
        source_sha256 = (
            recorded
            if isinstance(recorded, str)
            else hashlib.sha256(storage.read_bytes(row["path"])).hexdigest()
        )
        seed = video_clip_seed(row["image_id"])
        clip_id = video_clip_address(settings, source_sha256, row["image_id"], seed)
        stem = f"{row['prompt_id']}/{int(row['image_index']):02d}_{clip_id[:ADDRESS_CHARS]}"
        planned.append(
            PlannedVideoClip(
                source_image_id=row["image_id"],
                source_path=str(row["path"]),
                source_sha256=source_sha256,
                prompt_id=row["prompt_id"],
                image_index=int(row["image_index"]),
                seed=seed,
                clip_id=clip_id,
                stem=stem,
            )
        )
    return planned


@dataclass(frozen=True)
class VideoStepContext:
    """Where one partition's clips go and whose run makes them."""

    storage: Storage
    prompt_set: str
    backend: str
    run_id: str
    preview_side: int = 256
    writer_threads: int = DEFAULT_WRITER_THREADS


def run_video_step(
    settings: VideoClipSettings,
    generator: Callable[[], SvdGenerator],
    planned: list[PlannedVideoClip],
    step: VideoStepContext,
    log: Callable[[str], None] = print,
) -> StepOutcome[VideoClipRecord]:
    """Make the clips that are missing, write MP4 and preview atomically, describe every clip.

    ``generator()`` gives the generator ``settings`` describe; it is called only when some
    clip is missing, so a step with nothing to make never creates (or imports) it.
    """
    # One run at a time per partition: a second one waits, then lists and finds the work done.
    with partition_claim(step.storage, "clips", step.prompt_set, step.backend, log):
        storage = step.storage
        folder = clips_folder(storage, step.prompt_set, step.backend)
        swept = storage.sweep_temp_files(folder)
        if swept:
            log(f"Removed {swept} temporary file(s) left by an interrupted run.")
        on_disk = storage.list_files(folder)
        made_before = (
            finished_outputs(
                storage, "clips", "clip_id", prompt_set=step.prompt_set, backend=step.backend
            )
            if on_disk
            else FinishedOutputs({})
        )
        metadata = RunMetadataWriter(
            storage, "clips", run_id=step.run_id, prompt_set=step.prompt_set, backend=step.backend
        )

        def record(
            item: PlannedVideoClip, status: str, run_id: str, **facts: object
        ) -> VideoClipRecord:
            return VideoClipRecord(
                run_id=run_id,
                prompt_set=step.prompt_set,
                backend=step.backend,
                clip_id=item.clip_id,
                source_image_id=item.source_image_id,
                source_path=item.source_path,
                prompt_id=item.prompt_id,
                image_index=item.image_index,
                model_id=settings.model_id,
                revision=settings.revision,
                seed=item.seed,
                width=settings.width,
                height=settings.height,
                frames=settings.frames,
                fps=settings.fps,
                steps=settings.steps,
                motion_bucket_id=settings.motion_bucket_id,
                noise_aug_strength=settings.noise_aug_strength,
                status=status,
                **facts,  # type: ignore[arg-type]
            )

        def files(item: PlannedVideoClip) -> tuple[UPath, UPath]:
            return folder / f"{item.stem}.mp4", folder / f"{item.stem}.webp"

        def describe_existing(item: PlannedVideoClip) -> Iterator[VideoClipRecord]:
            path, preview = files(item)
            size = on_disk[f"{item.stem}.mp4"]
            if item.clip_id not in made_before:
                # Made by a run killed before its row was flushed: the preview carries that row.
                facts = facts_from_json(read_preview_facts(storage.read_bytes(preview)))
                made_by = facts.pop("run_id", step.run_id)
                video = storage.read_bytes(path)
                sha256 = hashlib.sha256(video).hexdigest()
                yield record(
                    item,
                    "ok",
                    made_by,
                    **facts,
                    path=str(path),
                    preview_path=str(preview),
                    sha256=sha256,
                    bytes=len(video),
                    recovered=True,
                )
            else:
                sha256 = made_before.sha256_now(storage, path, item.clip_id, size, log)
            yield record(
                item,
                "skipped_existing",
                step.run_id,
                path=str(path),
                preview_path=str(preview),
                sha256=sha256,
                bytes=size,
                started_at=utc_now(),
                finished_at=utc_now(),
            )

        def generate(
            items: list[PlannedVideoClip],
        ) -> Iterator[tuple[PlannedVideoClip, VideoClipResult]]:
            for item in items:
                started_at = utc_now()
                source = Image.open(io.BytesIO(storage.read_bytes(item.source_path)))
                result = generator().generate(source, item.seed)
                result.started_at = started_at
                if result.status != "ok":
                    log(f"Clip of {item.prompt_id}[{item.image_index}] failed: {result.error}")
                yield item, result

        def write(item: PlannedVideoClip, result: VideoClipResult) -> VideoClipRecord:
            facts = {
                "error": result.error,
                "memory_fallback": result.memory_fallback,
                "seconds": result.seconds,
                "device": generator().device,
                "peak_gpu_memory_mb": result.peak_gpu_memory_mb,
                "started_at": result.started_at,
                "finished_at": utc_now(),
            }
            if result.status != "ok":
                return record(item, result.status, step.run_id, **facts)
            path, preview = files(item)
            video = mp4_bytes(result.frames, settings.fps)
            # The MP4 first, the preview (which carries the row) second: a clip is done when both
            # exist, and a done clip always has its facts.
            storage.write_bytes(path, video)
            storage.write_bytes(
                preview,
                webp_preview_bytes(
                    result.frames, settings.fps, step.preview_side, {**facts, "run_id": step.run_id}
                ),
            )
            sha256 = hashlib.sha256(video).hexdigest()
            return record(
                item,
                "ok",
                step.run_id,
                **facts,
                path=str(path),
                preview_path=str(preview),
                sha256=sha256,
                bytes=len(video),
            )

        return run_generation_step(
            what=f"clips {step.prompt_set}/{step.backend}",
            planned=planned,
            key=lambda item: item.clip_id,
            is_done=lambda item: f"{item.stem}.mp4" in on_disk and f"{item.stem}.webp" in on_disk,
            describe_existing=describe_existing,
            load=lambda: generator().load(),
            generate=generate,
            write=write,
            metadata=metadata,
            log=log,
            writer_threads=step.writer_threads,
        )
