"""One ``clips`` step of one partition, Dagster-free: choose source images, skip finished video
clips, make the rest (on the same skeleton as the images step).

Video clips are content-addressed like images: a clip's file name carries the sha256 of its
source image's content address, the SVD model and revision, size, frames, steps, fps, motion bucket,
noise augmentation, guidance and seed, so a re-run finds finished clips by name.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
from PIL import Image
from upath import UPath

from imagegen_pipeline.claims import partition_claim
from imagegen_pipeline.image_files import DECODE_ERRORS
from imagegen_pipeline.records import (
    EXISTING_STATUSES,
    VideoClipRecord,
    facts_from_json,
    utc_now,
)
from imagegen_pipeline.steps.images import ADDRESS_CHARS
from imagegen_pipeline.steps.skeleton import (
    DEFAULT_WRITER_THREADS,
    StepOutcome,
    StepPlace,
    run_step,
)
from imagegen_pipeline.steps.verify import VerifyMode
from imagegen_pipeline.storage import Storage
from imagegen_pipeline.video.video_clip import (
    VideoClipResult,
    VideoClipSettings,
    video_clip_address,
    video_clip_seed,
)
from imagegen_pipeline.video.video_files import (
    mp4_bytes,
    read_mp4_frames,
    read_preview_facts,
    webp_preview_bytes,
)

if TYPE_CHECKING:
    from imagegen_pipeline.video.svd import SvdGenerator

Selection = Literal["all", "first_n", "top_n"]


@dataclass(frozen=True)
class PlannedVideoClip:
    """A clip the step is asked for: its source image, seed, content address and files."""

    source_image_id: str
    source_path: str
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


def plan_video_clips(sources: pd.DataFrame, settings: VideoClipSettings) -> list[PlannedVideoClip]:
    """One planned clip per source image row (``settings``: the generator's, or
    ``video_clip_settings`` before any generator exists)."""
    planned = []
    for row in sources.to_dict("records"):
        seed = video_clip_seed(row["image_id"])
        clip_id = video_clip_address(settings, row["image_id"], seed)
        stem = f"{row['prompt_id']}/{int(row['image_index']):02d}_{clip_id[:ADDRESS_CHARS]}"
        planned.append(
            PlannedVideoClip(
                source_image_id=row["image_id"],
                source_path=str(row["path"]),
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
    verify: VerifyMode = "size"


@dataclass
class VideoClipsKind:
    """Video clips as an output kind of the step skeleton: an MP4 and its preview each."""

    settings: VideoClipSettings
    generator: Callable[[], SvdGenerator]
    step: VideoStepContext
    log: Callable[[str], None]
    table: str = "clips"
    id_column: str = "clip_id"

    @property
    def folder_parts(self) -> tuple[str, ...]:
        return ("clips", self.step.prompt_set, self.step.backend)

    @property
    def what(self) -> str:
        return f"clips {self.step.prompt_set}/{self.step.backend}"

    def key(self, item: PlannedVideoClip) -> str:
        return item.clip_id

    def files(self, item: PlannedVideoClip) -> tuple[str, ...]:
        # The MP4 first (its sha256 and size are in the rows), the preview second.
        return f"{item.stem}.mp4", f"{item.stem}.webp"

    def output_id(self, item: PlannedVideoClip) -> str:
        return item.clip_id

    def check(self, item: PlannedVideoClip, data: bytes) -> None:
        frames = len(read_mp4_frames(data))
        if frames != self.settings.frames:
            raise ValueError(f"{frames} frames decode, {self.settings.frames} were made")

    def recover(self, item: PlannedVideoClip) -> dict[str, Any]:
        storage = self.step.storage
        preview = storage.read_bytes(storage.path(*self.folder_parts, self.files(item)[1]))
        return facts_from_json(read_preview_facts(preview))

    def derived(self, item: PlannedVideoClip) -> list[tuple[tuple[str, ...], str]]:
        return []  # video_quality rescoring follows the new clip's sha256

    def record(
        self, item: PlannedVideoClip, status: str, run_id: str, **facts: Any
    ) -> VideoClipRecord:
        settings = self.settings
        if status in EXISTING_STATUSES:
            preview = self.step.storage.path(*self.folder_parts, self.files(item)[1])
            facts.setdefault("preview_path", str(preview))
        return VideoClipRecord(
            run_id=run_id,
            prompt_set=self.step.prompt_set,
            backend=self.step.backend,
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
            **facts,
        )

    def load(self) -> float:
        return self.generator().load()

    def produce(
        self, items: list[PlannedVideoClip]
    ) -> Iterator[tuple[PlannedVideoClip, VideoClipResult]]:
        for item in items:
            started_at = utc_now()
            try:
                data = self.step.storage.read_bytes(item.source_path)
                with Image.open(io.BytesIO(data)) as opened:
                    source = opened.convert("RGB")
            except DECODE_ERRORS as error:  # an unreadable source fails its clip alone
                result = VideoClipResult("failed", error=f"{type(error).__name__}: {error}")
            else:
                result = self.generator().generate(source, item.seed)
            result.started_at = started_at
            if result.status != "ok":
                self.log(f"Clip of {item.prompt_id}[{item.image_index}] failed: {result.error}")
            yield item, result

    def write(self, item: PlannedVideoClip, result: VideoClipResult) -> VideoClipRecord:
        facts = {
            "error": result.error,
            "memory_fallback": result.memory_fallback,
            "seconds": result.seconds,
            "device": self.generator().device,
            "peak_gpu_memory_mb": result.peak_gpu_memory_mb,
            "started_at": result.started_at,
            "finished_at": utc_now(),
        }
        run_id = self.step.run_id
        if result.status != "ok":
            return self.record(item, result.status, run_id, **facts)
        storage = self.step.storage
        path, preview = (storage.path(*self.folder_parts, name) for name in self.files(item))
        video = mp4_bytes(result.frames, self.settings.fps)
        # The MP4 first, the preview (which carries the row) second: a clip is done when both
        # exist, and a done clip always has its facts.
        storage.write_bytes(path, video)
        facts_of_run = {**facts, "run_id": run_id}
        side = self.step.preview_side
        storage.write_bytes(
            preview, webp_preview_bytes(result.frames, self.settings.fps, side, facts_of_run)
        )
        sha256 = hashlib.sha256(video).hexdigest()
        return self.record(
            item,
            "ok",
            run_id,
            **facts,
            path=str(path),
            preview_path=str(preview),
            sha256=sha256,
            bytes=len(video),
        )


def run_video_step(
    settings: VideoClipSettings,
    generator: Callable[[], SvdGenerator],
    planned: list[PlannedVideoClip],
    step: VideoStepContext,
    log: Callable[[str], None] = print,
) -> StepOutcome[VideoClipRecord]:
    """Make the clips that are missing or damaged, write MP4 and preview atomically, describe
    every clip.

    ``generator()`` gives the generator ``settings`` describe; it is called only when some
    clip is missing, so a step with nothing to make never creates (or imports) it.
    """
    place = StepPlace(
        step.storage,
        step.prompt_set,
        step.backend,
        step.run_id,
        writer_threads=step.writer_threads,
        verify=step.verify,
    )
    # Held over listing and making: a second run of the partition waits, then finds it done.
    with partition_claim(step.storage, "clips", step.prompt_set, step.backend, log):
        return run_step(VideoClipsKind(settings, generator, step, log), planned, place, log)
