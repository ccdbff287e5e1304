"""Verify, then trust: what a step finds on disk is checked before it is skipped.

A file is damaged when its size differs from its row, when it does not decode, or (under
``verify="hash"``, and always in ``imagegen verify``) when its sha256 differs from its row. A
damaged file is treated as missing: moved aside to ``<storage>/quarantine/<same path>`` (with
the time in its name, so nothing is ever overwritten) and made again; files made from it
(an image's video clips) are moved aside with it, so they are made again from the new one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
import pyarrow as pa
from upath import UPath

from imagegen_pipeline.image_files import DECODE_ERRORS, verify_png
from imagegen_pipeline.records import RECORD_TYPES, TABLE_SCHEMAS, utc_now
from imagegen_pipeline.run_metadata import load_run_metadata, planning_rows, write_records
from imagegen_pipeline.storage import Storage

if TYPE_CHECKING:
    from imagegen_pipeline.steps.skeleton import OutputKind, StepPlace

VerifyMode = Literal["size", "hash"]  # "size": size and decoding; "hash": and the sha256
QUARANTINE = "quarantine"


def damage_of(
    data: bytes,
    check: Callable[[bytes], None],
    recorded_size: int | None,
    recorded_sha256: str | None,
    mode: VerifyMode,
) -> str | None:
    """Why ``data`` cannot be trusted as the file its row describes, or None."""
    if recorded_size is not None and len(data) != recorded_size:
        return f"size {len(data)} bytes, its row says {recorded_size}"
    if mode == "hash" and recorded_sha256 and hashlib.sha256(data).hexdigest() != recorded_sha256:
        return "sha256 differs from its row"
    try:
        check(data)
    except DECODE_ERRORS as error:
        return f"does not decode: {type(error).__name__}: {error}"
    return None


def quarantine(storage: Storage, parts: tuple[str, ...], name: str) -> UPath:
    """Move ``<base>/<parts>/<name>`` to the quarantine; returns where it went."""
    source = storage.path(*parts, name)
    stem, dot, suffix = name.rpartition(".")
    stamp = utc_now().strftime("%Y%m%dT%H%M%S%fZ")
    moved = f"{stem}.{stamp}{dot}{suffix}" if dot else f"{name}.{stamp}"
    target = storage.path(QUARANTINE, *parts, moved)
    storage.move(source, target)
    return target


@dataclass
class Inspection:
    """What one existing output turned out to be."""

    size: int
    recorded_sha256: str | None
    existing: Any = None  # its skipped_existing record, when it can be trusted
    recovered: Any = None  # its rebuilt generation row, when its row was lost
    damage: str | None = None


@dataclass
class PartitionFiles:
    """One listing of a partition's output folder and what its run metadata says was made."""

    storage: Storage
    parts: tuple[str, ...]
    place: StepPlace
    on_disk: dict[str, int]
    made: dict[str, tuple[str | None, int | None]]  # output id -> recorded (sha256, bytes)
    damaged: dict[str, str] = field(default_factory=dict)  # output id -> why, latest row
    swept: int = 0

    @classmethod
    def survey(
        cls,
        storage: Storage,
        parts: tuple[str, ...],
        table: str,
        id_column: str,
        place: StepPlace,
    ) -> PartitionFiles:
        """Sweep temporary files, list the folder once, read the partition's rows once."""
        folder = storage.path(*parts)
        swept = storage.sweep_temp_files(folder)
        on_disk = storage.list_files(folder)
        made: dict[str, tuple[str | None, int | None]] = {}
        damaged: dict[str, str] = {}
        if on_disk or storage.exists(storage.path(QUARANTINE, *parts)):
            columns = [id_column, "status", "error", "sha256", "bytes"]
            rows = planning_rows(
                storage, table, columns, prompt_set=place.prompt_set, backend=place.backend
            )
            rows = rows[rows["status"].isin(["ok", "damaged"])]
            for row in rows.to_dict("records"):  # in write order: the last row of an id wins
                output_id = row[id_column]
                if row["status"] == "damaged":
                    damaged[output_id] = str(row["error"])
                    made.pop(output_id, None)
                    continue
                damaged.pop(output_id, None)
                size = None if pd.isna(row["bytes"]) else int(row["bytes"])
                made[output_id] = (row["sha256"], size)
        return cls(storage, parts, place, on_disk, made, damaged, swept)

    def all_listed(self, names: tuple[str, ...]) -> bool:
        """True when every file of an output exists."""
        return all(name in self.on_disk for name in names)

    def pending_damage(self, output_id: str) -> str | None:
        """Why an output's file was moved aside (by ``imagegen verify``) and not made since."""
        return self.damaged.get(output_id)

    def inspect(
        self, kind: OutputKind[Any], item: Any, names: tuple[str, ...], mode: VerifyMode
    ) -> Inspection:
        """Verify an output whose files all exist; rebuild its row if it was lost."""
        main = self.storage.path(*self.parts, names[0])
        size = self.on_disk[names[0]]
        output_id = kind.output_id(item)
        recorded_sha256, recorded_size = self.made.get(output_id, (None, None))
        found = Inspection(size, recorded_sha256)
        if recorded_size is not None and recorded_size != size:
            found.damage = f"size {size} bytes, its row says {recorded_size}"
            return found
        data = self.storage.read_bytes(main)
        found.damage = damage_of(
            data, lambda d: kind.check(item, d), recorded_size, recorded_sha256, mode
        )
        if found.damage is not None:
            return found
        sha256 = recorded_sha256
        if output_id not in self.made:
            # Made by a run killed before its row was flushed: the file carries that row.
            facts = kind.recover(item)
            made_by = facts.pop("run_id", self.place.run_id)
            sha256 = hashlib.sha256(data).hexdigest()
            paths = {"path": str(main), "sha256": sha256, "bytes": size}
            found.recovered = kind.record(item, "ok", made_by, **facts, **paths, recovered=True)
        found.existing = kind.record(
            item,
            "skipped_existing",
            self.place.run_id,
            path=str(main),
            sha256=sha256,
            bytes=size,
            started_at=utc_now(),
            finished_at=utc_now(),
        )
        return found

    def quarantine(
        self, kind: OutputKind[Any], item: Any, names: tuple[str, ...], log: Callable[[str], None]
    ) -> str:
        """Move an output's files, and what was made from it, aside; returns its main file's
        new path."""
        moved = [quarantine(self.storage, self.parts, name) for name in names]
        derived = kind.derived(item)
        for parts, name in derived:
            quarantine(self.storage, parts, name)
        extra = f", and {len(derived)} file(s) made from it" if derived else ""
        log(f"{'/'.join(self.parts)}/{names[0]} is damaged: moved to {moved[0]}{extra}.")
        return str(moved[0])


def _check_mp4(data: bytes) -> None:
    from imagegen_pipeline.video.video_files import read_mp4_frames

    if not read_mp4_frames(data):
        raise ValueError("no frame decodes")


# How ``imagegen verify`` decodes a file it finds by its row alone, by suffix.
FILE_CHECKS: dict[str, Callable[[bytes], None]] = {".png": verify_png, ".mp4": _check_mp4}
# The folder of each verified run-metadata table, and its content-address column.
VERIFIED_TABLES = {"images": "image_id", "clips": "clip_id"}


def clips_made_from(storage: Storage, prompt_set: str, backend: str, image: str) -> list[str]:
    """The clip files (any clip settings) made from image ``<prompt>/<index>_<address>.png``
    of a partition: ``<prompt>/<index>_*`` in its clips folder (one listing; damage is rare)."""
    prefix = image.rsplit("_", 1)[0] + "_"
    listed = storage.list_files(storage.path("clips", prompt_set, backend))
    return sorted(name for name in listed if name.startswith(prefix))


def verify_partition(
    storage: Storage, table: str, prompt_set: str, backend: str, log: Callable[[str], None]
) -> int:
    """Check the sha256, size and decoding of every file the rows of one partition say was
    made; move each damaged one (and an image's clips) aside with a ``damaged`` row. Returns
    how many were damaged. A missing file is not damage: the next run makes it."""
    id_column = VERIFIED_TABLES[table]
    parts = (table, prompt_set, backend)
    rows = load_run_metadata(storage, table, prompt_set=prompt_set, backend=backend)
    current = rows[rows["status"].isin(["ok", "damaged"])].drop_duplicates(id_column, keep="last")
    made = current[current["status"] == "ok"]
    folder = str(storage.path(*parts)).rstrip("/") + "/"
    damaged_rows = []
    for row in made.to_dict("records"):
        path = str(row["path"])
        if not path.startswith(folder):
            continue  # written under another storage base
        name = path[len(folder) :]
        try:
            data = storage.read_bytes(path)
        except FileNotFoundError:
            continue
        size = None if pd.isna(row["bytes"]) else int(row["bytes"])
        check = FILE_CHECKS.get("." + name.rsplit(".", 1)[-1], lambda _: None)
        reason = damage_of(data, check, size, row["sha256"], "hash")
        if reason is None:
            continue
        if table == "clips" and isinstance(row.get("preview_path"), str):
            preview = str(row["preview_path"])[len(folder) :]
            if storage.exists(storage.path(*parts, preview)):
                quarantine(storage, parts, preview)
        moved = quarantine(storage, parts, name)
        derived = clips_made_from(storage, prompt_set, backend, name) if table == "images" else []
        for clip in derived:
            quarantine(storage, ("clips", prompt_set, backend), clip)
        log(
            f"{path}: {reason}; moved to {moved}"
            + (f" with {len(derived)} clip file(s)" if derived else "")
        )
        stamp = utc_now()
        damaged_rows.append(
            {
                **row,
                "status": "damaged",
                "error": reason,
                "path": str(moved),
                "bytes": len(data),
                "run_id": "imagegen-verify",
                "started_at": stamp,
                "finished_at": stamp,
            }
        )
    if damaged_rows:
        record_type = RECORD_TYPES[table]
        ints = {f.name for f in TABLE_SCHEMAS[table] if pa.types.is_integer(f.type)}
        records = [record_type(**_plain(row, ints)) for row in damaged_rows]
        write_records(
            storage,
            table,
            records,
            run_id="imagegen-verify",
            prompt_set=prompt_set,
            backend=backend,
        )
    return len(damaged_rows)


def _plain(row: dict[str, Any], ints: set[str]) -> dict[str, Any]:
    """A pandas row as record fields: NaN as None, integer columns as ints, plain datetimes."""
    plain = {}
    for name, value in row.items():
        if pd.api.types.is_scalar(value) and pd.isna(value):
            value = None
        elif name in ints:
            value = int(value)
        elif isinstance(value, pd.Timestamp):
            value = value.to_pydatetime()
        plain[name] = value
    return plain


def verify_stored_outputs(
    storage: Storage, prompt_set: str | None = None, log: Callable[[str], None] = print
) -> dict[tuple[str, str, str], int]:
    """``verify_partition`` over every partition (of one prompt set) with run metadata;
    returns the damaged count of each (table, prompt set, backend)."""
    found: dict[tuple[str, str, str], int] = {}
    for table in VERIFIED_TABLES:
        root = storage.path("run_metadata", table)
        partitions = {
            tuple(name.split("/")[:2]) for name in storage.list_files(root) if name.count("/") == 2
        }
        for set_name, backend in sorted(partitions):
            if prompt_set is None or set_name == prompt_set:
                found[(table, set_name, backend)] = verify_partition(
                    storage, table, set_name, backend, log
                )
    return found
