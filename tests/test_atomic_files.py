"""Atomic writes leave the whole file or nothing, and temporary files are swept."""

import json

import pytest
from PIL import Image

from imagegen_pipeline.atomic_files import (
    atomic_path,
    encode_png,
    sweep_temp_files,
    write_bytes_atomic,
)


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "out" / "file.bin"
    write_bytes_atomic(target, b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as temp:
        temp.write_bytes(b"half-writ")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_file_appears_only_once_complete(tmp_path):
    target = tmp_path / "file.bin"
    with atomic_path(target) as temp:
        temp.write_bytes(b"data")
        assert not target.exists()
    assert target.read_bytes() == b"data"


def test_sweep_removes_only_temporary_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / ".x.png.abc.tmp").write_bytes(b"partial")
    (tmp_path / "a" / "x.png").write_bytes(b"done")
    assert sweep_temp_files(tmp_path) == 1
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.png"]


def test_png_text_chunks_round_trip(tmp_path):
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    path = tmp_path / "i.png"
    write_bytes_atomic(
        path, encode_png(image, {"parameters": json.dumps({"seed": 7}), "prompt": "café"})
    )
    with Image.open(path) as loaded:
        assert json.loads(loaded.text["parameters"]) == {"seed": 7}
        assert loaded.text["prompt"] == "café"
