"""Reject means replace, Dagster-free: which images to make again, and their new requests.

A replacement is the rejected image's request (prompt, negative prompt, size, LoRAs, control
image: read from its run-metadata row) with a new seed. The new seed is deterministic: the
slot's next attempt (1 for the first replacement of an original, 2 for a replacement of that
one, ...) hashed with the prompt id and image index, so asking twice for the same replacement
makes one image (the second request finds it by its content address). The new row's
``replaces`` names the rejected image, whose file stays where it is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from imagegen_pipeline.backends.base import ImageRequest
from imagegen_pipeline.control import ControlInput, control_of
from imagegen_pipeline.lora import adapters_of
from imagegen_pipeline.model_settings import ImageTarget
from imagegen_pipeline.records import EXISTING_STATUSES
from imagegen_pipeline.reviews import latest_per_image
from imagegen_pipeline.run_metadata import load_run_metadata
from imagegen_pipeline.steps.images import (
    ADDRESS_CHARS,
    SEED_MODULUS,
    PlannedImage,
    content_address,
)
from imagegen_pipeline.storage import Storage


@dataclass(frozen=True)
class Replacement:
    """One image to make again: the image it replaces, and a seed if one was asked for."""

    prompt_set: str
    backend: str
    image_id: str  # the image replaced
    seed: int | None = None  # None: the slot's next deterministic seed


def replacement_seed(prompt_id: str, image_index: int, attempt: int) -> int:
    """The seed of the ``attempt``-th replacement (1, 2, ...) of an image slot."""
    digest = hashlib.sha256(f"{prompt_id}:{image_index}:replacement:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_MODULUS


def image_rows(storage: Storage, prompt_set: str, backend: str) -> pd.DataFrame:
    """The current rows of a partition's existing images."""
    rows = load_run_metadata(storage, "images", prompt_set=prompt_set, backend=backend)
    return rows[rows["status"].isin(EXISTING_STATUSES) & rows["path"].notna()]


def attempt_of(rows: pd.DataFrame, image_id: str) -> int:
    """How many replacements stand behind ``image_id`` (0 for an original)."""
    replaces = dict(zip(rows["image_id"], rows["replaces"], strict=True))
    depth, current, seen = 0, replaces.get(image_id), {image_id}
    while isinstance(current, str) and current not in seen:
        depth += 1
        seen.add(current)
        current = replaces.get(current)
    return depth


def newest_in_slot(rows: pd.DataFrame, prompt_id: str, image_index: int) -> str | None:
    """The image now shown for a slot: the newest one no other image replaces."""
    slot = rows[(rows["prompt_id"] == prompt_id) & (rows["image_index"] == image_index)]
    slot = slot[~slot["image_id"].isin(set(rows["replaces"].dropna()))]
    if slot.empty:
        return None
    return str(slot.sort_values("recorded_at")["image_id"].iloc[-1])


def recorded_control(cell: object) -> ControlInput | None:
    """The control an image row recorded (the image's path and hash when it was made), or None.

    Rows written before control existed have no such column (NaN in the merged table)."""
    if not isinstance(cell, str) or not cell:
        return None
    control = json.loads(cell)
    return ControlInput(
        Path(control["image"]), control["sha256"], control["type"], float(control["scale"])
    )


def request_from_row(row: dict, seed: int) -> ImageRequest:
    """An image row's request (prompt, negative prompt, size, LoRAs, control) with ``seed``;
    its control as recorded, so the request of an image already made keeps its address."""
    loras = json.loads(row["loras"]) if row["loras"] else []
    return ImageRequest(
        prompt_id=row["prompt_id"],
        image_index=int(row["image_index"]),
        prompt=row["prompt"],
        negative_prompt=row["negative_prompt"] or "",
        seed=int(seed) % SEED_MODULUS,
        width=int(row["width"]),
        height=int(row["height"]),
        loras=adapters_of(";".join(f"{a['source']}:{a['scale']}" for a in loras)),
        control=recorded_control(row.get("control")),
    )


def planned(request: ImageRequest, target: ImageTarget, replaces: str) -> PlannedImage:
    """A replacement image as the images step plans one."""
    image_id = content_address(target.settings, request)
    name = f"{request.prompt_id}/{request.image_index:02d}_{image_id[:ADDRESS_CHARS]}.png"
    return PlannedImage(request, image_id, name, replaces=replaces)


def plan_replacements(
    rows: pd.DataFrame, replacements: Iterable[Replacement], target: ImageTarget
) -> tuple[list[PlannedImage], list[str]]:
    """The planned images of ``replacements`` (rows: the partition's ``image_rows``), and a
    message per replacement that cannot be planned (its image is unknown)."""
    by_id = {row["image_id"]: row for row in rows.to_dict("records")}
    plans, problems = [], []
    for wanted in replacements:
        old = by_id.get(wanted.image_id)
        if old is None:
            problems.append(
                f"{wanted.prompt_set}/{wanted.backend}: no image {wanted.image_id[:16]} to replace"
            )
            continue
        index = int(old["image_index"])
        seed = wanted.seed
        if seed is None:
            seed = replacement_seed(old["prompt_id"], index, attempt_of(rows, old["image_id"]) + 1)
        request = request_from_row(old, seed)
        if request.control:  # a new image is drawn under the control image as it is now
            was = request.control
            try:
                now = control_of(str(was.path), was.type, was.scale)
            except FileNotFoundError:
                problems.append(
                    f"{old['prompt_id']}[{index}]: its control image is gone ({was.path})"
                )
                continue
            request = replace(request, control=now)
        plan = planned(request, target, old["image_id"])
        if plan.image_id == old["image_id"]:
            problems.append(f"{old['prompt_id']}[{index}]: seed {seed} makes the same image again")
            continue
        plans.append(plan)
    return plans, problems


def standing_replacements(
    storage: Storage, prompt_set: str, backend: str, target: ImageTarget
) -> list[PlannedImage]:
    """The replacements made so far in a partition, planned again so that the images step
    lists them beside the CSV's images (and quality, clips and the gallery see them)."""
    # One narrow read first: the images step of every partition calls this, and almost none
    # has replacements (about half the time of reading the full rows).
    marks = load_run_metadata(
        storage, "images", prompt_set=prompt_set, backend=backend, columns=["replaces"]
    )
    if marks["replaces"].isna().all():
        return []
    rows = image_rows(storage, prompt_set, backend).dropna(subset=["replaces"])
    return [
        planned(request_from_row(row, row["seed"]), target, row["replaces"])
        for row in rows.to_dict("records")
    ]


def rejects_to_replace(new_verdicts: pd.DataFrame, storage: Storage) -> list[Replacement]:
    """The images rejected in ``new_verdicts`` whose latest verdict is still a reject and that
    no image replaces yet (a sensor's new verdict parts; ``verdict_history`` columns)."""
    if new_verdicts.empty:
        return []
    latest = latest_per_image(new_verdicts)
    rejected = latest[latest["verdict"] == "reject"]
    wanted = []
    for (prompt_set, backend), group in rejected.groupby(["prompt_set", "backend"]):
        rows = image_rows(storage, prompt_set, backend)
        replaced = set(rows["replaces"].dropna())
        for image_id in group["image_id"]:
            if image_id not in replaced:
                wanted.append(Replacement(prompt_set, backend, image_id))
    return wanted


def made_by_run(storage: Storage, run_id: str, prompt_sets: Iterable[str]) -> dict[str, set[str]]:
    """Per backend, the prompt sets (of ``prompt_sets``) where run ``run_id`` made a
    replacement: the partitions whose scores, keepers and clips now lag behind."""
    made: dict[str, set[str]] = {}
    for prompt_set in sorted(set(prompt_sets)):
        rows = load_run_metadata(
            storage, "images", prompt_set=prompt_set, columns=["backend", "run_id", "replaces"]
        )
        ours = rows[(rows["run_id"] == run_id) & rows["replaces"].notna()]
        for backend in ours["backend"].unique():
            made.setdefault(str(backend), set()).add(prompt_set)
    return made
