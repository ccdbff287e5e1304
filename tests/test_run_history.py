"""Run history: one current row per output, bounded files per partition, compaction beside
writers and readers (local folder and S3), and no row lost to a full disk."""

from __future__ import annotations

import errno
import hashlib
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from upath import UPath

from imagegen_pipeline.records import ImageRecord
from imagegen_pipeline.run_metadata import (
    COMPACT_FILES,
    RunMetadataNotWritten,
    RunMetadataWriter,
    compact_partition,
    load_run_metadata,
    planning_rows,
    run_metadata_folder,
    write_records,
)
from imagegen_pipeline.steps.images import ImagesStepContext, plan_images, run_images_step
from imagegen_pipeline.steps.scores import with_generation_facts
from imagegen_pipeline.storage import Storage
from tests.backends.test_diffusers_backends import enhanced_prompts, make_flux
from tests.services import S3Service, ServiceUnavailable, start_s3


def made_now(storage) -> dict:
    """What a step planning the partition finds made: output id -> (sha256, bytes)."""
    rows = planning_rows(
        storage,
        "images",
        ["image_id", "status", "sha256", "bytes"],
        prompt_set="s",
        backend="flux_schnell",
    )
    made = rows[rows["status"] == "ok"]
    return {
        row["image_id"]: (
            None if pd.isna(row["sha256"]) else row["sha256"],
            None if pd.isna(row["bytes"]) else int(row["bytes"]),
        )
        for row in made.to_dict("records")
    }


def image(run_id: str, output: str, status: str = "ok", **facts: object) -> ImageRecord:
    return ImageRecord(
        run_id=run_id,
        prompt_set="s",
        backend="flux_schnell",
        image_id=output,
        prompt_id="p",
        image_index=0,
        prompt="a cat",
        negative_prompt="",
        model_id="m",
        revision="main",
        seed=0,
        width=64,
        height=64,
        steps=1,
        guidance=0.0,
        status=status,
        **facts,  # type: ignore[arg-type]
    )


def partition_files(storage: Storage, table: str = "images") -> list[str]:
    folder = run_metadata_folder(storage, table, "s", "flux_schnell")
    return sorted(storage.list_files(folder))


class CountingStorage(Storage):
    """A real Storage that counts the files it reads."""

    reads = 0

    def read_bytes(self, path: UPath | str) -> bytes:
        self.reads += 1
        return super().read_bytes(path)


# --- one current row per output ------------------------------------------------------------


def test_a_regenerated_image_supersedes_its_stale_row(tiny_flux: Path, tmp_path: Path) -> None:
    backend = make_flux(tiny_flux)
    planned = plan_images(enhanced_prompts(), backend.target)[:3]
    storage = Storage(tmp_path)

    def run(run_id: str) -> None:
        step = ImagesStepContext(storage, "set", run_id=run_id)
        run_images_step(backend.target, lambda: backend, planned, step, log=lambda _: None)

    run("run-1")
    first = load_run_metadata(storage, "images")
    lost = Path(first.loc[first["image_id"] == planned[0].image_id, "path"].item())
    lost.unlink()  # deleted by hand: the next run makes it again
    run("run-2")

    current = load_run_metadata(storage, "images")
    assert sorted(current["image_id"]) == sorted(p.image_id for p in planned)
    for row in current.to_dict("records"):  # exactly one row per file, and it is the file's
        assert row["status"] == "ok" and pd.isna(row["superseded_by"])
        assert row["sha256"] == hashlib.sha256(Path(row["path"]).read_bytes()).hexdigest()
    regenerated = current.set_index("image_id").loc[planned[0].image_id]
    assert regenerated["run_id"] == "run-2"

    history = load_run_metadata(storage, "images", history=True)
    stale = history[(history["image_id"] == planned[0].image_id) & (history["run_id"] == "run-1")]
    assert stale["superseded_by"].tolist() == [regenerated["row_id"]]
    assert history["row_id"].is_unique


def test_the_last_generation_row_of_an_output_is_current(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    rows = [
        image("r1", "a", "failed", error="boom"),
        image("r1", "b"),
        image("r2", "a", recovered=True),  # rebuilt from the PNG after a killed run
        image("r3", "b", "skipped_existing"),  # only says the file was there
        image("r3", "a", "skipped_existing"),
    ]
    write_records(storage, "images", rows, run_id="r", prompt_set="s", backend="flux_schnell")
    current = load_run_metadata(storage).set_index("image_id")
    assert current.index.tolist() == ["b", "a"]
    assert current.loc["a", "run_id"] == "r2" and current.loc["b", "run_id"] == "r1"
    history = load_run_metadata(storage, history=True)
    superseded = {
        run + output: by if isinstance(by, str) else None
        for run, output, by in zip(
            history.run_id, history.image_id, history.superseded_by, strict=True
        )
    }
    assert superseded == {
        "r1a": rows[2].row_id,
        "r1b": None,
        "r2a": None,
        "r3b": rows[1].row_id,
        "r3a": rows[2].row_id,
    }
    steps_columns = load_run_metadata(storage, "steps", history=True).columns
    assert "superseded_by" not in steps_columns and "row_id" in steps_columns


def test_readers_need_no_skipped_existing_rows(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    made = [image("r1", "a", seconds=2.0, sha256="s-a", bytes=10), image("r1", "b")]
    redo = image("r2", "a", seconds=3.0, sha256="s-a2", bytes=11)
    for run_id, rows in (("r1", made), ("r2", [redo])):
        write_records(
            storage, "images", rows, run_id=run_id, prompt_set="s", backend="flux_schnell"
        )
    done = made_now(storage)
    assert done == {"a": ("s-a2", 11), "b": (None, None)}
    # A re-run's table row (as the images step reports an image it found) gets the facts of
    # the run that made the file now on disk, from the current rows alone.
    table = load_run_metadata(storage).assign(status="skipped_existing", seconds=None)
    facts = with_generation_facts(table, load_run_metadata(storage)).set_index("image_id")
    assert facts.loc["a", "generation_seconds"] == 3.0


# --- bounded history ---------------------------------------------------------------------------


def test_files_per_partition_stay_bounded_and_planning_reads_few(tmp_path: Path) -> None:
    storage = CountingStorage(tmp_path)
    for run in range(60):
        rows = [image(f"run{run}", f"img{run}-{i}") for i in range(3)]
        write_records(
            storage, "images", rows, run_id=f"run{run}", prompt_set="s", backend="flux_schnell"
        )
        write_records(
            storage, "steps", [], run_id=f"run{run}", prompt_set="s", backend="flux_schnell"
        )
        assert len(partition_files(storage)) <= COMPACT_FILES + 1
    frame = load_run_metadata(storage, "images")
    assert len(frame) == 180 and frame["row_id"].is_unique
    assert frame["image_id"].tolist() == [f"img{r}-{i}" for r in range(60) for i in range(3)]

    storage.reads = 0
    done = made_now(storage)
    assert len(done) == 180
    assert storage.reads <= COMPACT_FILES + 1


def test_planning_compacts_parts_left_by_older_code(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    folder = Path(run_metadata_folder(storage, "images", "s", "flux_schnell").path)
    for run in range(20):  # as before compaction: one part per run, never merged
        writer = RunMetadataWriter(
            storage,
            "images",
            run_id=f"r{run}",
            prompt_set="s",
            backend="flux_schnell",
            compact_files=10**6,
        )
        writer.append(image(f"r{run}", f"i{run}"))
        writer.close()
    assert len(list(folder.iterdir())) == 20
    done = made_now(storage)
    assert len(done) == 20
    assert len(list(folder.iterdir())) == 1  # one compacted file with every row
    assert len(load_run_metadata(storage, "images", history=True)) == 20


# --- compaction beside writers and readers -------------------------------------------------


def hammer(storage: Storage, writers: int = 3, rows_each: int = 40) -> None:
    """Writers flushing a row at a time and compacting every 3 parts, while a reader checks
    that it never sees a row twice and never loses one it saw."""
    stop = threading.Event()
    problems: list[str] = []

    def read() -> None:
        seen: set[str] = set()
        while not stop.is_set():
            frame = load_run_metadata(storage, "images", prompt_set="s", backend="flux_schnell")
            ids = frame["row_id"].tolist()
            if len(ids) != len(set(ids)):
                problems.append(f"duplicates: {[i for i, n in Counter(ids).items() if n > 1]}")
            if missing := seen - set(ids):
                problems.append(f"lost {len(missing)} row(s)")
            seen |= set(ids)

    def write(number: int) -> None:
        writer = RunMetadataWriter(
            storage,
            "images",
            run_id=f"w{number}",
            prompt_set="s",
            backend="flux_schnell",
            flush_rows=1,
            compact_files=3,
        )
        for index in range(rows_each):
            writer.append(image(f"w{number}", f"w{number}-{index}"))
        writer.close()
        assert writer.compactions > 0, writer.compaction_error

    reader = threading.Thread(target=read)
    reader.start()
    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    stop.set()
    reader.join(timeout=60)
    assert problems == []
    frame = load_run_metadata(storage, "images")
    assert sorted(frame["image_id"]) == sorted(
        f"w{n}-{i}" for n in range(writers) for i in range(rows_each)
    )
    # Each writer leaves fewer than compact_files parts since its last compaction.
    assert len(partition_files(storage)) <= 3 * writers + 1


def test_compaction_beside_writers_and_a_reader_on_a_local_folder(tmp_path: Path) -> None:
    hammer(Storage(tmp_path))


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Service]:
    try:
        service = start_s3(tmp_path_factory.mktemp("s3"))
    except ServiceUnavailable as exc:
        pytest.skip(str(exc))
    yield service
    service.stop()


def test_compaction_beside_writers_and_a_reader_on_s3(s3: S3Service) -> None:
    hammer(Storage(f"s3://{s3.bucket}/history", **s3.storage_options), rows_each=15)


def test_a_compaction_that_lost_the_race_deletes_nothing(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    for run in range(5):
        write_records(
            storage,
            "images",
            [image(f"r{run}", f"i{run}")],
            run_id=f"r{run}",
            prompt_set="s",
            backend="flux_schnell",
        )
    before = partition_files(storage)

    class Vanishing(Storage):  # another compaction removes a file between listing and reading
        def read_bytes(self, path: UPath | str) -> bytes:
            if str(path).endswith(before[2]):
                raise FileNotFoundError(path)
            return super().read_bytes(path)

    assert not compact_partition(Vanishing(tmp_path), "images", "s", "flux_schnell", min_files=2)
    assert partition_files(storage) == before


# --- a full disk -------------------------------------------------------------------------------


class FullDisk(Storage):
    """A real Storage whose run-metadata writes fail with ENOSPC while ``full`` is set."""

    full = True

    def write_bytes(self, path: UPath, data: bytes) -> None:
        if self.full and "run_metadata" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        super().write_bytes(path, data)


def test_a_full_disk_parks_rows_in_the_spare_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("IMAGEGEN_METADATA_SPARE_DIR", str(tmp_path / "spare"))
    storage = FullDisk(tmp_path / "storage")
    writer = RunMetadataWriter(
        storage, "images", run_id="run-a", prompt_set="s", backend="flux_schnell"
    )
    for index in range(3):
        writer.append(image("run-a", f"i{index}"))
    with pytest.raises(RunMetadataNotWritten) as raised:
        writer.flush()
    message = str(raised.value)
    assert raised.value.errno == errno.ENOSPC
    assert "3 images row(s) of s/flux_schnell" in message and "No space left" in message
    assert str(writer.folder) in message and str(tmp_path / "spare") in message
    assert "nothing is lost" in message
    assert load_run_metadata(tmp_path / "storage").empty

    storage.full = False  # space freed: the next step of the partition moves the rows back
    done = made_now(storage)
    assert sorted(done) == ["i0", "i1", "i2"]
    assert not list((tmp_path / "spare").rglob("*.parquet"))


def test_with_no_spare_room_the_rows_wait_for_the_next_flush(tmp_path: Path, monkeypatch) -> None:
    spare = tmp_path / "spare-is-a-file"
    spare.write_text("not a folder")  # so parking the rows fails too
    monkeypatch.setenv("IMAGEGEN_METADATA_SPARE_DIR", str(spare))
    storage = FullDisk(tmp_path / "storage")
    writer = RunMetadataWriter(
        storage, "images", run_id="run-a", prompt_set="s", backend="flux_schnell"
    )
    writer.append(image("run-a", "i0"))
    with pytest.raises(RunMetadataNotWritten, match="kept in memory") as raised:
        writer.flush()
    assert str(writer.folder) in str(raised.value) and str(spare) in str(raised.value)
    writer.append(image("run-a", "i1"))
    storage.full = False
    writer.close()
    assert load_run_metadata(storage)["image_id"].tolist() == ["i0", "i1"]
