"""The one base path every output lands under: a local folder or an object-store URL.

Paths are ``upath.UPath`` objects, so ``storage`` and ``s3://bucket/prefix`` work the same way
(S3 through s3fs; credentials and endpoint from the usual AWS variables). Writes are atomic
wherever the store allows it: on a local disk a hidden temporary file in the destination folder
is written, flushed and renamed over the final name (a run killed at any point leaves at worst a
``.*.tmp`` file, which the next run sweeps away); on an object store one PUT creates the object
whole. New files get the permissions the umask allows, so other users of shared storage can read
them. Skip checks list a folder once instead of asking about every file, which on an object store
would cost one request per image.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from upath import UPath

TEMP_SUFFIX = ".tmp"
LOCAL_PROTOCOLS = ("", "file", "local")


def is_local(path: UPath) -> bool:
    """True for a path on this machine's filesystem."""
    return path.protocol in LOCAL_PROTOCOLS


def _write_local_atomic(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    # 0o666 masked by the umask, like any new file; tempfile.mkstemp would make it 0600.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


class StorageFullError(OSError):
    """A write refused for lack of space (or quota); the message says what to free."""


def _full_disk_error(path: Path, size: int, cause: OSError) -> StorageFullError:
    try:
        free = f"{shutil.disk_usage(path.parent).free:,} bytes free"
    except OSError:
        free = "free space unknown"
    reason = "disk quota exceeded" if cause.errno == errno.EDQUOT else "no space left on device"
    return StorageFullError(
        cause.errno,
        f"{path}: {reason} writing {size:,} bytes ({free} there). This file was not written "
        "(its temporary file was removed); files already written are unchanged. Free some "
        "space and run again: finished files are skipped.",
    )


class Storage:
    """Reads, atomic writes and listings under one base path (a folder or an fsspec URL)."""

    def __init__(self, base: str | os.PathLike[str], **storage_options: object) -> None:
        if not is_local(UPath(base)):
            # Other processes (celery workers, runs) write to the same store: a listing cached
            # by this process's fsspec instance would hide their objects from info/exists/open.
            storage_options.setdefault("use_listings_cache", False)
        self.base = UPath(base, **storage_options)

    def __repr__(self) -> str:
        return f"Storage({str(self.base)!r})"

    @property
    def is_local(self) -> bool:
        """True when the base is a folder on this machine."""
        return is_local(self.base)

    def path(self, *parts: str) -> UPath:
        """``base / part / part ...``."""
        return self.base.joinpath(*parts)

    def resolve(self, location: str | os.PathLike[str]) -> UPath:
        """A path recorded in a table (absolute, relative or a URL) with this store's options."""
        text = str(location)
        if "://" in text:
            return UPath(text, **self.base.storage_options)
        return UPath(text)

    def write_bytes(self, path: UPath, data: bytes) -> None:
        """Write ``data`` to ``path`` whole or not at all."""
        if is_local(path):
            local = Path(path.path)
            try:
                local.parent.mkdir(parents=True, exist_ok=True)
                _write_local_atomic(local, data)
            except OSError as error:
                if error.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise _full_disk_error(local, len(data), error) from error
                raise
        else:
            path.fs.pipe_file(path.path, data)  # one PUT: the object appears whole

    def write_file(self, path: UPath, write: Callable[[Path], None], suffix: str = "") -> None:
        """Publish what ``write(local_file)`` writes (for encoders that need a real file)."""
        with tempfile.TemporaryDirectory(prefix="imagegen-") as folder:
            local = Path(folder) / f"output{suffix or path.suffix}"
            write(local)
            self.write_bytes(path, local.read_bytes())

    def read_bytes(self, path: UPath | str) -> bytes:
        """The bytes of a file."""
        target = path if isinstance(path, UPath) else self.resolve(path)
        return target.read_bytes()

    def open_binary(self, path: UPath | str) -> io.BytesIO:
        """A file's bytes as a seekable buffer (decoders want one; S3 streams are not)."""
        return io.BytesIO(self.read_bytes(path))

    def move(self, source: UPath, target: UPath) -> None:
        """Move a file (a rename on a disk; copy then delete on an object store)."""
        if is_local(source) and is_local(target):
            Path(target.path).parent.mkdir(parents=True, exist_ok=True)
            os.replace(source.path, target.path)
        else:
            self.write_bytes(target, self.read_bytes(source))
            source.fs.rm_file(source.path)

    def delete(self, path: UPath) -> None:
        """Remove a file; one already gone is fine (another process may have removed it)."""
        if is_local(path):
            Path(path.path).unlink(missing_ok=True)
            return
        with contextlib.suppress(FileNotFoundError):
            path.fs.rm_file(path.path)

    def exists(self, path: UPath) -> bool:
        """True when ``path`` exists."""
        return path.exists()

    def list_files(self, folder: UPath) -> dict[str, int]:
        """Every file under ``folder`` with its size in bytes, by POSIX path relative to it: one
        listing, not a probe per file. Temporary files of interrupted writes are left out."""
        if is_local(folder):
            root = Path(folder.path)
            if not root.is_dir():
                return {}
            found = {}
            for directory, _, names in os.walk(root):
                relative = Path(directory).relative_to(root)
                for name in names:
                    if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                        continue
                    try:
                        size = (Path(directory) / name).stat().st_size
                    except FileNotFoundError:  # removed since the walk saw it (a compaction)
                        continue
                    found[(relative / name).as_posix()] = size
            return found
        prefix = folder.path.rstrip("/") + "/"
        try:
            entries = folder.fs.find(folder.path, detail=True)
        except FileNotFoundError:
            return {}
        return {
            name[len(prefix) :]: int(info.get("size") or 0)
            for name, info in entries.items()
            if name.startswith(prefix)
        }

    def sweep_temp_files(self, folder: UPath) -> int:
        """Delete the temporary files that killed runs left under ``folder``; returns how many.

        Object stores never hold partial objects, so there is nothing to sweep there."""
        if not is_local(folder) or not Path(folder.path).is_dir():
            return 0
        swept = 0
        for temp in Path(folder.path).rglob(f".*{TEMP_SUFFIX}"):
            temp.unlink(missing_ok=True)
            swept += 1
        return swept
