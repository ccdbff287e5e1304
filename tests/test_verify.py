"""Verify, then trust: damaged outputs are moved to the quarantine with a row and made again,
and one unreadable file never fails thumbnails."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagegen_pipeline.cli import main as imagegen
from imagegen_pipeline.defs.metadata import thumbnails
from imagegen_pipeline.image_files import verify_png
from imagegen_pipeline.run_metadata import load_run_metadata
from imagegen_pipeline.steps.images import ImagesStepContext, plan_images, run_images_step
from imagegen_pipeline.storage import Storage
from tests.backends.test_diffusers_backends import enhanced_prompts, make_flux

QUIET = {"log": lambda _: None}


def run(tiny_flux: Path, storage: Storage, run_id: str, verify: str = "size"):
    backend = make_flux(tiny_flux)
    planned = plan_images(enhanced_prompts(), backend.target)
    step = ImagesStepContext(storage, "set", run_id, verify=verify)  # type: ignore[arg-type]
    return run_images_step(backend.target, lambda: backend, planned, step, **QUIET), backend


def rows(storage: Storage):
    # History: a damaged row is superseded by the row of the image made again.
    return load_run_metadata(
        storage, "images", prompt_set="set", backend="flux_schnell", history=True
    )


def flip_a_pixel_byte(path: Path) -> None:
    """Same size, different bytes, inside the compressed pixels (IDAT)."""
    data = bytearray(path.read_bytes())
    position = data.index(b"IDAT") + 40
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def rewrite_software_chunk(path: Path) -> None:
    """Same size, a valid PNG with its checksums fixed: only a sha256 tells it apart."""
    data = bytearray(path.read_bytes())
    start = data.index(b"imagegen-pipeline")
    data[start + len("imagegen-pipeline") - 1] = ord("X")
    chunk_start = data.rindex(b"iTXt", 0, start) - 4
    (length,) = struct.unpack(">I", data[chunk_start : chunk_start + 4])
    body = bytes(data[chunk_start + 4 : chunk_start + 8 + length])
    data[chunk_start + 8 + length : chunk_start + 12 + length] = struct.pack(">I", zlib.crc32(body))
    path.write_bytes(bytes(data))


def quarantined(storage: Storage) -> list[Path]:
    return sorted(Path(storage.base.path, "quarantine").rglob("*.*"))


def test_a_truncated_image_is_moved_aside_with_a_row_and_made_again(tiny_flux, tmp_path):
    storage = Storage(tmp_path)
    first, _ = run(tiny_flux, storage, "run-1")
    damaged = Path(first.records[1].path)
    good = damaged.read_bytes()
    damaged.write_bytes(good[: len(good) // 2])

    second, backend = run(tiny_flux, storage, "run-2")
    assert second.counts == {"ok": 1, "skipped_existing": 6} and backend.model_loads == 1
    remade = second.records[1]
    assert remade.path == str(damaged) and remade.run_id == "run-2"
    assert remade.damage and "size" in remade.damage
    verify_png(damaged.read_bytes())  # a whole PNG again
    (moved,) = quarantined(storage)
    assert moved.read_bytes() == good[: len(good) // 2]
    assert "quarantine/images/set/flux_schnell/cat/01_" in moved.as_posix()
    table = rows(storage)
    (row,) = table[table["status"] == "damaged"].to_dict("records")
    assert row["image_id"] == remade.image_id and row["path"] == str(moved)
    assert "size" in row["error"] and row["run_id"] == "run-2"
    # The new file's row carries a new sha256: its old scores can never be reused.
    assert (
        remade.sha256 == hashlib.sha256(damaged.read_bytes()).hexdigest() != first.records[1].sha256
    )


def test_a_same_size_corruption_fails_decoding_and_takes_its_clips_along(tiny_flux, tmp_path):
    storage = Storage(tmp_path)
    first, _ = run(tiny_flux, storage, "run-1")
    damaged = Path(first.records[0].path)
    flip_a_pixel_byte(damaged)
    clips = tmp_path / "clips" / "set" / "flux_schnell" / "cat"
    clips.mkdir(parents=True)
    (clips / "00_abc.mp4").write_bytes(b"a clip of the damaged image")
    (clips / "00_abc.webp").write_bytes(b"its preview")
    (clips / "01_def.mp4").write_bytes(b"a clip of another image")

    second, _ = run(tiny_flux, storage, "run-2")
    assert second.counts == {"ok": 1, "skipped_existing": 6}
    assert "does not decode" in second.records[0].damage
    assert sorted(p.name for p in clips.iterdir()) == ["01_def.mp4"]
    names = [p.name for p in quarantined(storage)]
    assert len(names) == 3 and sum(name.startswith("00_abc.") for name in names) == 2


def test_under_verify_hash_a_valid_but_different_file_is_damaged(tiny_flux, tmp_path):
    storage = Storage(tmp_path)
    first, _ = run(tiny_flux, storage, "run-1")
    changed = Path(first.records[2].path)
    rewrite_software_chunk(changed)
    verify_png(changed.read_bytes())  # still a valid PNG of the same size

    trusted, _ = run(tiny_flux, storage, "run-2")  # size + decode cannot tell
    assert trusted.counts == {"skipped_existing": 7}
    checked, _ = run(tiny_flux, storage, "run-3", verify="hash")
    assert checked.counts == {"ok": 1, "skipped_existing": 6}
    assert checked.records[2].damage == "sha256 differs from its row"


def test_imagegen_verify_quarantines_and_the_next_run_remakes(
    tiny_flux, tmp_path, monkeypatch, capsys
):
    storage = Storage(tmp_path)
    first, _ = run(tiny_flux, storage, "run-1")
    rewrite_software_chunk(Path(first.records[3].path))
    monkeypatch.setenv("IMAGEGEN_STORAGE", str(tmp_path))

    assert imagegen(["verify", "set"]) == 1
    assert "images set/flux_schnell: 1 damaged" in capsys.readouterr().out
    assert not Path(first.records[3].path).exists() and len(quarantined(storage)) == 1
    assert imagegen(["verify"]) == 0  # nothing left to find

    second, _ = run(tiny_flux, storage, "run-2")
    assert second.counts == {"ok": 1, "skipped_existing": 6}
    assert second.records[3].damage == "sha256 differs from its row"
    statuses = rows(storage).drop_duplicates("image_id", keep="last")["status"]
    assert set(statuses) == {"ok"}


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_thumbnails_skip_an_unreadable_file(tmp_path, damage):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    if damage == "truncated":
        bad.write_bytes(good.read_bytes()[:60])
    elif damage == "garbage":
        bad.write_bytes(b"not an image")
    text = thumbnails([str(bad), str(good)], lambda path: Path(path).read_bytes()).value
    assert text.count("data:image/jpeg;base64,") == 1
    assert "bad.png unreadable" in text
