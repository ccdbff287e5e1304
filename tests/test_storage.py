"""Storage: atomic local writes, one-PUT object-store writes, listings and temp-file sweeps.

Ports every test of the old ``test_atomic_files.py`` to the ``Storage`` API.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from upath import UPath

from imagegen_pipeline import storage as storage_module
from imagegen_pipeline.image_files import encode_png
from imagegen_pipeline.storage import Storage


def names_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def umask() -> Iterator[None]:
    """Restores the process umask whatever a test sets it to."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield
    os.umask(previous)


# --- ported from test_atomic_files.py -------------------------------------------------------


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    store = Storage(tmp_path)
    target = store.path("out", "file.bin")
    store.write_bytes(target, b"old")

    def killed_mid_write(local: Path) -> None:
        local.write_bytes(b"half-writ")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        store.write_file(target, killed_mid_write)
    assert (tmp_path / "out" / "file.bin").read_bytes() == b"old"
    assert names_in(tmp_path / "out") == ["file.bin"]


def test_file_appears_only_once_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Storage(tmp_path)
    final = tmp_path / "file.bin"
    seen_at_fsync: list[tuple[bool, list[bytes]]] = []
    real_fsync = os.fsync

    def spying_fsync(fd: int) -> None:
        # At fsync time the data is in the temp file; the final name must not exist yet.
        temps = [p.read_bytes() for p in tmp_path.glob(".file.bin.*.tmp")]
        seen_at_fsync.append((final.exists(), temps))
        real_fsync(fd)

    monkeypatch.setattr(storage_module.os, "fsync", spying_fsync)
    store.write_bytes(store.path("file.bin"), b"data")

    assert seen_at_fsync == [(False, [b"data"])]
    assert final.read_bytes() == b"data"
    assert names_in(tmp_path) == ["file.bin"]


def test_write_file_publishes_only_after_the_writer_returns(tmp_path: Path) -> None:
    store = Storage(tmp_path)
    target = store.path("clips", "c.mp4")
    existed_during_write: list[bool] = []

    def write(local: Path) -> None:
        assert local.suffix == ".mp4"  # encoders pick the format from the suffix
        assert not local.is_relative_to(tmp_path)  # written outside the destination
        local.write_bytes(b"movie")
        existed_during_write.append((tmp_path / "clips" / "c.mp4").exists())

    store.write_file(target, write)
    assert existed_during_write == [False]
    assert (tmp_path / "clips" / "c.mp4").read_bytes() == b"movie"


def test_sweep_removes_only_temporary_files(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / ".x.png.abc.tmp").write_bytes(b"partial")
    (tmp_path / "a" / "x.png").write_bytes(b"done")
    store = Storage(tmp_path)
    assert store.sweep_temp_files(store.base) == 1
    assert names_in(tmp_path / "a") == ["x.png"]
    assert store.sweep_temp_files(store.base) == 0
    assert store.sweep_temp_files(store.path("missing")) == 0


def test_png_text_chunks_round_trip(tmp_path: Path) -> None:
    store = Storage(tmp_path)
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    path = store.path("i.png")
    store.write_bytes(path, encode_png(image, {"seed": 7, "prompt": "café"}))
    with Image.open(tmp_path / "i.png") as loaded:
        assert json.loads(loaded.text["parameters"]) == {"prompt": "café", "seed": 7}
        assert loaded.text["prompt"] == "café"
        assert loaded.getpixel((3, 3)) == (10, 20, 30)


# --- permissions ----------------------------------------------------------------------------


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_new_files_get_the_permissions_the_umask_allows(
    tmp_path: Path, umask: None, mask: int, mode: int
) -> None:
    store = Storage(tmp_path)
    os.umask(mask)
    store.write_bytes(store.path("f.bin"), b"x")
    store.write_file(store.path("g.bin"), lambda local: local.write_bytes(b"y"))
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "g.bin").stat().st_mode) == mode


# --- interrupted writes ---------------------------------------------------------------------


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_interrupted_write_leaves_no_final_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    store = Storage(tmp_path)

    def interrupted(*args: object) -> None:
        raise OSError(f"{failing} interrupted")

    monkeypatch.setattr(storage_module.os, failing, interrupted)
    with pytest.raises(OSError, match="interrupted"):
        store.write_bytes(store.path("sub", "x.png"), b"pixels")
    monkeypatch.undo()

    assert names_in(tmp_path / "sub") == []
    assert store.list_files(store.base) == {}


# --- listings -------------------------------------------------------------------------------


def test_list_files_is_relative_posix_and_skips_temp_files(tmp_path: Path) -> None:
    store = Storage(tmp_path / "base")
    store.write_bytes(store.path("x.png"), b"1")
    store.write_bytes(store.path("set", "flux", "y.png"), b"2")
    (tmp_path / "base" / "set" / "flux" / ".x.png.abcd.tmp").write_bytes(b"partial")
    (tmp_path / "base" / ".hidden").write_bytes(b"kept: only .*.tmp files are temporary")

    assert set(store.list_files(store.base)) == {"x.png", "set/flux/y.png", ".hidden"}
    assert set(store.list_files(store.path("set"))) == {"flux/y.png"}
    assert store.list_files(store.path("nowhere")) == {}


def test_list_files_lists_the_folder_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Storage(tmp_path)
    for index in range(5):
        store.write_bytes(store.path("d", f"{index}.png"), b"x")
    walks: list[object] = []
    real_walk = os.walk

    def counting_walk(top: object, *args: object, **kwargs: object) -> Iterator[object]:
        walks.append(top)
        return real_walk(top, *args, **kwargs)

    monkeypatch.setattr(storage_module.os, "walk", counting_walk)
    assert len(store.list_files(store.path("d"))) == 5
    assert len(walks) == 1


# --- paths ----------------------------------------------------------------------------------


def test_resolve_relative_absolute_and_url(tmp_path: Path) -> None:
    store = Storage(tmp_path)
    store.write_bytes(store.path("a", "b.txt"), b"hello")

    absolute = store.resolve(str(tmp_path / "a" / "b.txt"))
    assert store.read_bytes(absolute) == b"hello"
    assert store.read_bytes(str(tmp_path / "a" / "b.txt")) == b"hello"
    assert store.open_binary(str(tmp_path / "a" / "b.txt")).read() == b"hello"

    url = store.resolve("memory://elsewhere/x.bin")
    assert isinstance(url, UPath)
    assert url.protocol == "memory"
    assert url.path.endswith("elsewhere/x.bin")


def test_local_and_url_bases(tmp_path: Path) -> None:
    assert Storage(tmp_path).is_local
    assert Storage(f"file://{tmp_path}").is_local
    assert not Storage("memory://bucket/base").is_local
    assert repr(Storage("memory://bucket/base")) == "Storage('memory://bucket/base')"


# --- object stores (fsspec's in-memory filesystem) ------------------------------------------


@pytest.fixture
def memory_store() -> Iterator[Storage]:
    store = Storage("memory://bucket/test-storage")
    yield store
    if store.base.exists():
        store.base.fs.rm(store.base.path, recursive=True)


def test_object_store_round_trip(memory_store: Storage) -> None:
    store = memory_store
    store.write_bytes(store.path("set", "flux", "a.png"), b"A")
    store.write_bytes(store.path("set", "gemini", "b.png"), b"B")
    store.write_file(store.path("clips", "c.mp4"), lambda local: local.write_bytes(b"C"))

    assert set(store.list_files(store.base)) == {
        "set/flux/a.png",
        "set/gemini/b.png",
        "clips/c.mp4",
    }
    assert set(store.list_files(store.path("set", "flux"))) == {"a.png"}
    assert store.list_files(store.path("absent")) == {}
    assert store.read_bytes(store.path("set", "flux", "a.png")) == b"A"
    assert store.read_bytes(str(store.path("clips", "c.mp4"))) == b"C"
    assert store.exists(store.path("set", "gemini", "b.png"))
    assert not store.exists(store.path("set", "gemini", "zzz.png"))
    assert store.sweep_temp_files(store.base) == 0
    # A rewrite replaces the object whole.
    store.write_bytes(store.path("set", "flux", "a.png"), b"A2")
    assert store.read_bytes(store.path("set", "flux", "a.png")) == b"A2"


# --- a full disk ----------------------------------------------------------------------------


def test_full_disk_says_which_file_how_much_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Storage(tmp_path)
    target = store.path("images", "cat.png")
    store.write_bytes(target, b"the old image")
    store.write_bytes(store.path("images", "dog.png"), b"another image")

    def disk_full(fd: int) -> None:  # delayed allocation: the disk fills when data is flushed
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage_module.os, "fsync", disk_full)
    with pytest.raises(storage_module.StorageFullError) as error:
        store.write_bytes(target, b"x" * 123_456)
    monkeypatch.undo()

    message = str(error.value)
    free = shutil.disk_usage(tmp_path).free
    assert error.value.errno == errno.ENOSPC
    assert str(tmp_path / "images" / "cat.png") in message and "123,456 bytes" in message
    free_figure = int(re.search(r"([\d,]+) bytes free", message).group(1).replace(",", ""))
    assert abs(free_figure - free) < 100 * 2**20
    assert "files already written are unchanged" in message
    assert names_in(tmp_path / "images") == ["cat.png", "dog.png"]  # temporary file removed
    assert (tmp_path / "images" / "cat.png").read_bytes() == b"the old image"


def test_a_really_full_file_system(tmp_path: Path) -> None:
    """The same on a 1 MB tmpfs (where this machine lets tests mount one)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        store = Storage(mount)
        store.write_bytes(store.path("kept.bin"), b"k" * 300_000)
        with pytest.raises(storage_module.StorageFullError, match=r"writing 2,000,000 bytes"):
            store.write_bytes(store.path("big.bin"), b"b" * 2_000_000)
        assert names_in(mount) == ["kept.bin"]
        assert (mount / "kept.bin").read_bytes() == b"k" * 300_000
    finally:
        subprocess.run(["umount", str(mount)], check=True)
