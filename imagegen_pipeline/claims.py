"""Claims: one holder at a time for a piece of work, kept in the output storage itself.

Two runs that cover the same partition at once (two ``imagegen demo``, two celery workers, the
sensor's run and a user's backfill) would otherwise both list the partition's folder, find the
same images missing and make them twice. A claim is one small JSON file under
``<storage>/claims/<name>.json`` naming its holder and when its lease expires:

- acquire is an atomic create: on a local (or shared POSIX) disk the claim is written to a
  temporary file and hard-linked to its name, which fails if the name exists, so a reader never
  sees a half-written claim; on S3 a ``PutObject`` with ``If-None-Match: *``.
- while held, a background thread renews the lease every third of its length: on a disk it
  rewrites the claim after checking it is still its own; on S3 a ``PutObject`` with
  ``If-Match`` on the claim's ETag, which fails if anyone replaced it.
- a holder that dies stops renewing; once the lease has expired (or at once, when the holder
  ran on this machine and its process is gone), contenders take the claim over, and only one
  of them can: on a disk each renames the stale claim to a private name
  (only one rename of a name succeeds) and then creates a fresh claim as above; on S3 each PUTs
  its claim with ``If-Match`` on the stale claim's ETag (only the first PUT matches).
- release deletes the claim (on S3 with ``If-Match``, so it never deletes a successor's).

Claims are per partition step (``images/<prompt set>/<backend>``), not per image: one object and
a few requests per step instead of per image, and the run that waited re-lists the partition
once the holder is done and finds every image made. Parallelism comes from partitions.

Limits: a lease is only as good as the clocks of the machines that share the storage (they
must agree to well within the lease) and as the holder's liveness: a holder frozen for longer
than its lease (a stopped VM) loses the claim to a contender and, when it wakes, notices at its
next renewal (logged) but does not stop mid-step. Outputs stay correct either way: writes are
atomic and content-addressed, so the worst case is work done twice, as without claims. An S3
store that ignores conditional writes (checked once per process with a probe object) gets no
claims, with a warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upath import UPath

from imagegen_pipeline.storage import TEMP_SUFFIX, Storage

DEFAULT_LEASE_SECONDS = 60.0  # how long a killed run's claim blocks the others
CLAIMS_FOLDER = "claims"


class ClaimBusy(RuntimeError):
    """Raised by ``hold(..., wait=False)`` when another live holder has the claim."""


def _this_machine() -> str:
    """The host name and PID namespace: holders that share it see one process table, so each
    can tell whether the other's process still exists. "" where that cannot be told."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{socket.gethostname()}/{namespace}"


MACHINE = _this_machine()


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it exists, as another user's process
    try:  # a killed process its parent has not reaped yet still answers signal 0
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


@dataclass(frozen=True)
class ClaimInfo:
    """What a claim file says: who holds it and until when (seconds since the epoch)."""

    holder: str  # "<host>:<pid>:<random token>"
    expires_at: float
    etag: str = ""  # S3 only: the object's ETag, for conditional writes
    machine: str = ""  # the holder's MACHINE
    pid: int = 0

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at

    def holder_gone(self) -> bool:
        """True when the holder ran on this machine and its process has ended (killed): no
        need to wait for its lease."""
        return bool(self.machine) and self.machine == MACHINE and _process_gone(self.pid)

    def stale(self) -> bool:
        """True when anyone may take the claim over."""
        return self.expired() or self.holder_gone()

    def describe(self) -> str:
        left = self.expires_at - time.time()
        return f"{self.holder} (lease {'expired' if left <= 0 else f'ends in {left:.0f} s'})"


def new_holder_id() -> str:
    """This process plus a random token: two claims of one process are different holders."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _claim_bytes(holder: str, lease_seconds: float) -> bytes:
    now = time.time()
    body = {
        "holder": holder,
        "machine": MACHINE,
        "pid": os.getpid(),
        "acquired_at": now,
        "expires_at": now + lease_seconds,
    }
    return json.dumps(body).encode()


def _parse(data: bytes, fallback_expiry: float, etag: str = "") -> ClaimInfo:
    try:
        body = json.loads(data)
        return ClaimInfo(
            str(body["holder"]),
            float(body["expires_at"]),
            etag,
            str(body.get("machine", "")),
            int(body.get("pid", 0)),
        )
    except (ValueError, KeyError, TypeError):
        # Not ours or damaged: treat it as a claim whose lease runs from its last write.
        return ClaimInfo("<unreadable claim>", fallback_expiry, etag)


class _LocalClaimFile:
    """A claim on a filesystem: link-to-create, rename-to-take-over."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self, lease_seconds: float) -> ClaimInfo | None:
        try:
            data = self.path.read_bytes()
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        return _parse(data, mtime + lease_seconds)

    def _temp(self, data: bytes) -> Path:
        temp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        return temp

    def create(self, data: bytes) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self._temp(data)
        try:
            os.link(temp, self.path)  # atomic, fails if the name exists; content already whole
            return True
        except FileExistsError:
            return False
        finally:
            temp.unlink(missing_ok=True)

    def renew(self, holder: str, data: bytes, lease_seconds: float) -> bool:
        current = self.read(lease_seconds)
        if current is None:
            # A contender that misjudged our claim stale moved it aside and is putting it back,
            # or it was never there: recreate it, which fails if someone else has it now.
            return self.create(data)
        if current.holder != holder:
            return False
        temp = self._temp(data)
        try:
            os.replace(temp, self.path)
        finally:
            temp.unlink(missing_ok=True)
        return True

    def take_over(self, stale: ClaimInfo, data: bytes, lease_seconds: float) -> bool:
        aside = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.stale{TEMP_SUFFIX}")
        try:
            os.rename(self.path, aside)  # only one contender moves a given file
        except FileNotFoundError:
            return False
        try:
            moved = _parse(aside.read_bytes(), aside.stat().st_mtime + lease_seconds)
            if moved.holder != stale.holder and not moved.stale():
                # Between our read and our rename another contender took the claim over:
                # put its live claim back (fails only if a third one created a claim meanwhile).
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
                return False
        finally:
            aside.unlink(missing_ok=True)
        return self.create(data)

    def release(self, holder: str, lease_seconds: float) -> None:
        current = self.read(lease_seconds)
        if current is not None and current.holder == holder:
            self.path.unlink(missing_ok=True)


class _S3ClaimObject:
    """A claim on S3: conditional PUTs (If-None-Match to create, If-Match to renew/take over)."""

    def __init__(self, path: UPath) -> None:
        self.fs = path.fs
        self.bucket, _, self.key = path.path.partition("/")
        self.etag = ""

    def _call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)

    def read(self, lease_seconds: float) -> ClaimInfo | None:
        try:
            response = self._call("get_object")
        except FileNotFoundError:
            return None
        data = _read_body(self.fs, response)
        modified = response.get("LastModified")
        fallback = (modified.timestamp() if modified else time.time()) + lease_seconds
        return _parse(data, fallback, response.get("ETag", ""))

    def _put(self, data: bytes, **condition: str) -> bool:
        try:
            response = self._call("put_object", Body=data, **condition)
        except (FileExistsError, FileNotFoundError):
            return False  # If-None-Match failed / the object to match is gone
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise
        self.etag = response.get("ETag", "")
        return True

    def create(self, data: bytes) -> bool:
        return self._put(data, IfNoneMatch="*")

    def renew(self, holder: str, data: bytes, lease_seconds: float) -> bool:
        return self._put(data, IfMatch=self.etag)

    def take_over(self, stale: ClaimInfo, data: bytes, lease_seconds: float) -> bool:
        return self._put(data, IfMatch=stale.etag)

    def release(self, holder: str, lease_seconds: float) -> None:
        # Fails when a successor took the claim over (its claim stays) or it is already gone.
        with contextlib.suppress(OSError):
            self._call("delete_object", IfMatch=self.etag)


def _read_body(fs: Any, response: dict[str, Any]) -> bytes:
    async def read() -> bytes:
        async with response["Body"] as stream:
            return await stream.read()

    from fsspec.asyn import sync

    return sync(fs.loop, read)


def _precondition_failed(exc: BaseException) -> bool:
    # s3fs turns 412 (If-Match failed) and 409 (another conditional write to the key in flight)
    # into plain OSErrors; the botocore error it wraps keeps the code.
    response = getattr(exc.__cause__, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


_HONOURED: dict[str, bool] = {}


def _conditional_writes_honoured(storage: Storage) -> bool:
    """Whether this object store refuses a second ``If-None-Match: *`` PUT (once per process)."""
    base = str(storage.base)
    if base not in _HONOURED:
        probe = _S3ClaimObject(storage.path(CLAIMS_FOLDER, f".probe-{secrets.token_hex(6)}"))
        first, second = probe.create(b"probe"), probe.create(b"probe")
        probe.release("", 0)
        _HONOURED[base] = first and not second
    return _HONOURED[base]


class Claim:
    """A held claim; a background thread renews its lease until ``release()``."""

    def __init__(self, name: str, store: Any, holder: str, lease_seconds: float, log: Any) -> None:
        self.name, self.holder = name, holder
        self._store, self._lease, self._log = store, lease_seconds, log
        self._stop = threading.Event()
        self.lost = False  # set when a renewal finds another holder
        self.renewals = 0
        self._thread = threading.Thread(target=self._renew_loop, name=f"claim {name}", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self._lease / 3):
            try:
                if self._store.renew(
                    self.holder, _claim_bytes(self.holder, self._lease), self._lease
                ):
                    self.renewals += 1
                    continue
            except Exception as exc:  # a store hiccup: the next renewal may work
                self._log(f"Claim {self.name}: renewal failed ({exc}); retrying.")
                continue
            self.lost = True
            self._log(f"Claim {self.name} was taken over after its lease expired.")
            return

    def release(self) -> None:
        """Stop renewing and delete the claim (if it is still ours)."""
        self._stop.set()
        self._thread.join()
        if not self.lost:
            self._store.release(self.holder, self._lease)


class Claims:
    """The claims of one storage."""

    def __init__(
        self,
        storage: Storage,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        poll_seconds: float | None = None,
    ) -> None:
        self.storage = storage
        self.lease_seconds = lease_seconds
        self.poll_seconds = (
            poll_seconds if poll_seconds is not None else min(5.0, lease_seconds / 4)
        )

    def _store(self, name: str) -> Any:
        path = self.storage.path(CLAIMS_FOLDER, *f"{name}.json".split("/"))
        if self.storage.is_local:
            return _LocalClaimFile(Path(path.path))
        return _S3ClaimObject(path)

    def read(self, name: str) -> ClaimInfo | None:
        """Who holds ``name`` now, if anyone."""
        return self._store(name).read(self.lease_seconds)

    def try_acquire(
        self, name: str, log: Callable[[str], None] = print
    ) -> tuple[Claim | None, ClaimInfo | None]:
        """``(claim, None)`` if this call got ``name``, else ``(None, the live holder)``."""
        store = self._store(name)
        holder = new_holder_id()
        while True:
            data = _claim_bytes(holder, self.lease_seconds)
            if store.create(data):
                return Claim(name, store, holder, self.lease_seconds, log), None
            current = store.read(self.lease_seconds)
            if current is None:
                continue  # released between our create and our read
            if not current.stale():
                return None, current
            if store.take_over(current, data, self.lease_seconds):
                why = "process has ended" if current.holder_gone() else "lease had expired"
                log(f"Took over claim {name} from {current.holder}, whose {why}.")
                return Claim(name, store, holder, self.lease_seconds, log), None
            # Someone else won the take-over (or put a live claim back): look again.

    @contextlib.contextmanager
    def hold(
        self,
        name: str,
        wait: bool = True,
        on_wait: Callable[[str], None] = print,
        timeout: float | None = None,
    ) -> Iterator[Claim | None]:
        """Hold ``name`` for the ``with`` block, waiting while another live holder has it.

        Yields ``None`` without claiming on an object store that ignores conditional writes."""
        if not self.storage.is_local and not _conditional_writes_honoured(self.storage):
            on_wait(f"{self.storage} ignores conditional writes: no claim for {name}.")
            yield None
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        last_holder = None
        while True:
            claim, current = self.try_acquire(name, on_wait)
            if claim is not None:
                break
            assert current is not None
            if not wait or (deadline is not None and time.monotonic() >= deadline):
                raise ClaimBusy(f"{name} is held by {current.describe()}")
            if current.holder != last_holder:
                on_wait(f"Waiting for {name}: held by {current.describe()}.")
                last_holder = current.holder
            time.sleep(self.poll_seconds)
        try:
            yield claim
        finally:
            claim.release()


def partition_claim(
    storage: Storage, step: str, prompt_set: str, backend: str, log: Callable[[str], None]
) -> contextlib.AbstractContextManager[Claim | None]:
    """The claim of one step of one partition, held while the step lists and makes its outputs:
    a second run waits, then finds the work done."""
    return Claims(storage).hold(f"{step}/{prompt_set}/{backend}", on_wait=log)
