"""Real services on 127.0.0.1 for the distributed tests: Redis, PostgreSQL, an S3 server, workers.

Every ``start_*`` function starts one real server process on a fresh free port, waits until it
answers, and returns a :class:`RunningService` whose ``stop()`` ends it and removes what it made
(also usable as a context manager). A start that fails part-way undoes what it had done before
raising. Two kinds of failure:

- :class:`ServiceUnavailable`: this machine cannot run the service at all (a binary or package
  is missing). Its message names the service; tests ``pytest.skip(str(exc))`` on it.
- :class:`ServiceStartError`: the service is installed but did not come up. That is a real
  failure, so tests let it fail; the message ends with the tail of the service's log.

Services:

- :func:`start_redis`: Debian's ``redis-server``, no persistence. ``.url`` =
  ``redis://127.0.0.1:PORT/0``.
- :func:`start_postgres`: Debian's PostgreSQL server (``/usr/lib/postgresql/*/bin``) in a
  throw-away data directory, trust auth, listening on 127.0.0.1 only, run as the ``postgres``
  system user when we are root (postgres refuses to run as root). ``.url`` =
  ``postgresql://dagster@127.0.0.1:PORT/dagster``; ``.params`` has host, port, user, password,
  db; :func:`postgres_storage_config` turns it into Dagster's ``storage:`` block.
- :func:`start_s3`: moto's S3 server (``python -m moto.server``) in a subprocess, with one
  bucket. ``.url`` is the endpoint, ``.bucket`` the bucket, ``.env`` the environment variables
  that point boto3/s3fs/dagster-aws at it (fake credentials and ``AWS_ENDPOINT_URL``) and
  ``.storage_options`` the s3fs/universal-pathlib keyword arguments
  (``s3fs.S3FileSystem(**svc.storage_options)``,
  ``upath.UPath("s3://bucket/key", **svc.storage_options)``).
- :func:`start_celery_worker`: ``dagster-celery worker start`` with a ``-y`` worker config, its
  queues (default: dagster-celery's ``dagster`` queue), a node name ``NAME@HOSTNAME`` and
  prefork concurrency 1. ``.hostname`` is the node name that dagster-celery reports as "Celery
  worker" in the run's event log; ``.kill()`` SIGKILLs the whole worker (main process and pool
  children), ``.pool_pids()`` lists the pool children (the processes that run the steps).

Dagster on them: :func:`write_dagster_home` writes a DAGSTER_HOME whose instance lives in the
PostgreSQL server (with the ``postgresql+psycopg2`` scheme: SQLAlchemy 2.1 would pick the
missing psycopg 3 driver for a bare ``postgresql://``); :func:`celery_workers_by_step` reads
from a run's event log which celery worker executed each step.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

LOCALHOST = "127.0.0.1"
POSTGRES_USER = "dagster"
POSTGRES_DB = "dagster"
S3_REGION = "us-east-1"
S3_FAKE_KEY = "testing"
S3_FAKE_SECRET = "testing"
# dagster-celery's default queue: steps without a ``dagster-celery/queue`` tag go there.
CELERY_DEFAULT_QUEUE = "dagster"

_START_ATTEMPTS = 3  # a free port can be taken between choosing it and binding it: retry


class ServiceUnavailable(RuntimeError):
    """The service cannot run on this machine (its binary or package is missing)."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"{name} is unavailable: {why}")
        self.name = name
        self.why = why


class ServiceStartError(RuntimeError):
    """The service is installed but did not start (the message ends with its log's tail)."""


class RunningService:
    """A started service: where it listens, how to reach it, and how to stop it."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        process: subprocess.Popen[bytes] | None = None,
        log_path: Path | None = None,
        params: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        cleanup: contextlib.ExitStack | None = None,
    ) -> None:
        self.name = name
        self.url = url
        self.process = process
        self.log_path = log_path
        self.params: dict[str, Any] = dict(params or {})
        self.env: dict[str, str] = dict(env or {})
        self._cleanup = cleanup or contextlib.ExitStack()

    @property
    def port(self) -> int:
        return int(self.params["port"])

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        """The service's log so far ('' when there is none)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Stop the service and remove what it made; calling it again does nothing."""
        self._cleanup.close()

    def __enter__(self) -> RunningService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.url}>"


class S3Service(RunningService):
    """A running S3 server with one bucket."""

    @property
    def bucket(self) -> str:
        return str(self.params["bucket"])

    @property
    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` / ``upath.UPath`` that reach this server."""
        return {
            "key": S3_FAKE_KEY,
            "secret": S3_FAKE_SECRET,
            "endpoint_url": self.url,
            "client_kwargs": {"region_name": S3_REGION},
        }


class CeleryWorker(RunningService):
    """A running ``dagster-celery worker start`` process group."""

    @property
    def hostname(self) -> str:
        """The celery node name, e.g. ``gpu-1@myhost``: the event log's "Celery worker" value."""
        return str(self.params["hostname"])

    @property
    def queues(self) -> list[str]:
        return list(self.params["queues"])

    def pool_pids(self) -> list[int]:
        """PIDs of the prefork pool children, the processes that execute the steps."""
        tree = _process_group_tree(self.params["pgid"])
        celery_mains = {pid for pid, ppid in tree.items() if ppid == self.pid}
        return sorted(pid for pid, ppid in tree.items() if ppid in celery_mains)

    def kill(self) -> None:
        """SIGKILL the whole worker at once (main process and pool children): a lost machine."""
        _signal_group(self.params["pgid"], signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=30)
        _wait_group_gone(self.params["pgid"], timeout=10)


# --- helpers --------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def _log_tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:]) or "(empty log)"


def _wait_until(
    ready: Callable[[], bool],
    *,
    what: str,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
    interval: float = 0.1,
) -> None:
    """Poll ``ready`` until it is true; fail early when ``process`` exits, late on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if ready():
                return
        if process is not None and process.poll() is not None:
            raise ServiceStartError(
                f"{what} exited with code {process.returncode} before it was ready; log:\n"
                f"{_log_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            raise ServiceStartError(
                f"{what} was not ready after {timeout:.0f} s; log:\n{_log_tail(log_path)}"
            )
        time.sleep(interval)


def _terminate(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _process_group_tree(pgid: int) -> dict[int, int]:
    """{pid: parent pid} of the live processes of a process group (read from /proc)."""
    tree: dict[int, int] = {}
    for stat_path in glob.glob("/proc/[0-9]*/stat"):
        try:
            stat = Path(stat_path).read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may contain spaces and parentheses
        fields = stat[stat.rindex(")") + 2 :].split()
        state, ppid, pgrp = fields[0], int(fields[1]), int(fields[2])
        if pgrp == pgid and state != "Z":
            tree[int(stat.split(" ", 1)[0])] = ppid
    return tree


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _process_group_tree(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _stop_group(process: subprocess.Popen[bytes], pgid: int, timeout: float = 20) -> None:
    """SIGTERM a process group (a warm shutdown), then SIGKILL whatever is left of it."""
    _signal_group(pgid, signal.SIGTERM)
    if not _wait_group_gone(pgid, timeout):
        _signal_group(pgid, signal.SIGKILL)
        _wait_group_gone(pgid, 10)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def _retrying_port(start: Callable[[int], RunningService]) -> RunningService:
    """Start on a fresh free port, again on another one if the start failed."""
    error: ServiceStartError | None = None
    for _ in range(_START_ATTEMPTS):
        try:
            return start(free_port())
        except ServiceStartError as exc:
            error = exc
    assert error is not None
    raise error


def _venv_executable(name: str) -> str | None:
    """``name`` beside this interpreter (the virtualenv's bin) or else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


# --- Redis ----------------------------------------------------------------------------------


def _redis_pings(port: int) -> bool:
    with socket.create_connection((LOCALHOST, port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


def start_redis(tmp_dir: str | os.PathLike[str]) -> RunningService:
    """Debian's ``redis-server`` on 127.0.0.1 and a free port, without persistence."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServiceUnavailable("redis", "no redis-server binary (apt-get install redis-server)")
    workdir = Path(tempfile.mkdtemp(prefix="redis-", dir=tmp_dir))

    def start(port: int) -> RunningService:
        log_path = workdir / f"redis-{port}.log"
        with contextlib.ExitStack() as cleanup:
            process = subprocess.Popen(
                [
                    binary,
                    "--bind",
                    LOCALHOST,
                    "--port",
                    str(port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                    "--logfile",
                    str(log_path),
                    "--dir",
                    str(workdir),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            cleanup.callback(_terminate, process)
            _wait_until(
                lambda: _redis_pings(port),
                what="redis-server",
                timeout=20,
                process=process,
                log_path=log_path,
            )
            service = RunningService(
                "redis",
                f"redis://{LOCALHOST}:{port}/0",
                process=process,
                log_path=log_path,
                params={"host": LOCALHOST, "port": port, "db": 0},
                cleanup=cleanup.pop_all(),
            )
            return service
        raise AssertionError("unreachable")

    return _retrying_port(start)


# --- PostgreSQL -----------------------------------------------------------------------------


def find_postgres_bindir() -> Path:
    """The newest ``/usr/lib/postgresql/*/bin`` with initdb, pg_ctl and postgres (or PATH's)."""
    needed = ("initdb", "pg_ctl", "postgres")

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", Path(path).parent.name))

    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if all(os.access(Path(bindir, tool), os.X_OK) for tool in needed):
            return Path(bindir)
    on_path = [shutil.which(tool) for tool in needed]
    if all(on_path):
        return Path(on_path[0]).parent  # type: ignore[arg-type]
    raise ServiceUnavailable(
        "postgresql",
        "no initdb/pg_ctl/postgres under /usr/lib/postgresql/*/bin or on PATH "
        "(apt-get install postgresql)",
    )


def _postgres_os_user() -> tuple[list[str], int, int]:
    """The command prefix that runs the server as a non-root user, and that user's uid/gid."""
    if os.geteuid() != 0:
        return [], os.getuid(), os.getgid()
    for name in ("postgres", "nobody"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        if shutil.which("runuser"):
            return ["runuser", "-u", name, "--"], user.pw_uid, user.pw_gid
        if shutil.which("setpriv"):
            prefix = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}"]
            return [*prefix, "--clear-groups", "--"], user.pw_uid, user.pw_gid
        raise ServiceUnavailable("postgresql", "running as root and neither runuser nor setpriv")
    raise ServiceUnavailable("postgresql", "running as root and no 'postgres' or 'nobody' user")


# SQLAlchemy 2.1 maps a bare ``postgresql://`` URL to the psycopg (3) driver, which is not
# installed: dagster-postgres depends on psycopg2. Name the driver in the scheme.
POSTGRES_SQLALCHEMY_SCHEME = "postgresql+psycopg2"


def postgres_storage_config(postgres: RunningService) -> dict[str, Any]:
    """Dagster's instance ``storage:`` block (dagster_postgres, ``postgres_db``) for a server."""
    params = postgres.params
    return {
        "postgres": {
            "postgres_db": {
                "username": params["user"],
                "password": params["password"],
                "hostname": params["host"],
                "db_name": params["db"],
                "port": params["port"],
                "scheme": POSTGRES_SQLALCHEMY_SCHEME,
            }
        }
    }


def start_postgres(tmp_dir: str | os.PathLike[str]) -> RunningService:
    """A PostgreSQL server in a fresh data directory on 127.0.0.1 and a free port, database
    ``dagster`` owned by superuser ``dagster``, trust auth.

    The data directory and unix socket live in a new folder under the system temp dir owned by
    the server's user (a root-only pytest tmp dir is not reachable by the ``postgres`` user, and
    socket paths must stay short); the server log is copied into ``tmp_dir`` on stop.
    """
    bindir = find_postgres_bindir()
    prefix, uid, gid = _postgres_os_user()
    tmp_dir = Path(tmp_dir)

    def start(port: int) -> RunningService:
        with contextlib.ExitStack() as cleanup:
            root = Path(tempfile.mkdtemp(prefix="imagegen-pg-"))
            cleanup.callback(shutil.rmtree, root, ignore_errors=True)
            data, sockets = root / "data", root / "sockets"
            sockets.mkdir()
            log_path = root / "postgres.log"
            kept_log = tmp_dir / f"postgres-{port}.log"
            for path in (root, sockets):
                os.chown(path, uid, gid)
            os.chmod(root, 0o700)

            def run_as_user(*args: str, timeout: float = 60) -> None:
                result = subprocess.run(
                    [*prefix, *args],
                    cwd=root,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=timeout,
                    check=False,
                )
                if result.returncode != 0:
                    output = (result.stdout + result.stderr).decode(errors="replace")
                    raise ServiceStartError(
                        f"postgresql: {Path(args[0]).name} failed ({result.returncode}):\n"
                        f"{output[-3000:]}\nserver log:\n{_log_tail(log_path)}"
                    )

            run_as_user(
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                POSTGRES_USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            )
            with (data / "postgresql.conf").open("a") as conf:
                conf.write(
                    "\n# imagegen tests\n"
                    f"listen_addresses = '{LOCALHOST}'\n"
                    f"port = {port}\n"
                    f"unix_socket_directories = '{sockets}'\n"
                    "max_connections = 200\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                )

            def stop_server() -> None:
                if (data / "postmaster.pid").exists():
                    try:
                        run_as_user(
                            str(bindir / "pg_ctl"),
                            "-D",
                            str(data),
                            "stop",
                            "-m",
                            "fast",
                            "-w",
                            "-t",
                            "30",
                            timeout=60,
                        )
                    except (ServiceStartError, subprocess.TimeoutExpired):
                        _kill_postmaster(data)
                with contextlib.suppress(OSError):
                    shutil.copyfile(log_path, kept_log)

            cleanup.callback(stop_server)
            run_as_user(
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(log_path),
                "-w",
                "-t",
                "60",
                "start",
                timeout=90,
            )
            create = subprocess.run(
                [
                    str(bindir / "createdb"),
                    "-h",
                    LOCALHOST,
                    "-p",
                    str(port),
                    "-U",
                    POSTGRES_USER,
                    POSTGRES_DB,
                ],
                capture_output=True,
                timeout=60,
                check=False,
            )
            if create.returncode != 0:
                raise ServiceStartError(
                    f"postgresql: createdb failed: {create.stderr.decode(errors='replace')}"
                )
            service = RunningService(
                "postgresql",
                f"postgresql://{POSTGRES_USER}@{LOCALHOST}:{port}/{POSTGRES_DB}",
                log_path=log_path,
                params={
                    "host": LOCALHOST,
                    "port": port,
                    "user": POSTGRES_USER,
                    "password": "",
                    "db": POSTGRES_DB,
                    "sqlalchemy_url": f"{POSTGRES_SQLALCHEMY_SCHEME}://{POSTGRES_USER}@"
                    f"{LOCALHOST}:{port}/{POSTGRES_DB}",
                    "data_dir": str(data),
                    "socket_dir": str(sockets),
                },
                cleanup=cleanup.pop_all(),
            )
            return service
        raise AssertionError("unreachable")

    return _retrying_port(start)


def _kill_postmaster(data: Path) -> None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((data / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, signal.SIGQUIT)  # immediate shutdown of the postmaster and its children
        time.sleep(2)
        os.kill(pid, signal.SIGKILL)


# --- S3 (moto) ------------------------------------------------------------------------------


def s3_client_env(endpoint_url: str) -> dict[str, str]:
    """Environment variables that point boto3, s3fs and dagster-aws at an S3 endpoint."""
    return {
        "AWS_ACCESS_KEY_ID": S3_FAKE_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_FAKE_SECRET,
        "AWS_DEFAULT_REGION": S3_REGION,
        "AWS_REGION": S3_REGION,
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ENDPOINT_URL_S3": endpoint_url,
    }


# moto's server as `python -m moto.server` starts it, but serving one request at a time: moto
# checks a conditional PUT's precondition (If-None-Match: *, If-Match) and then writes, so two
# threads can both pass it, where S3 decides atomically. Claims race on exactly that.
MOTO_ONE_REQUEST_AT_A_TIME = """
import sys
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication, MotoRequestHandler, create_backend_app,
)
host, port = sys.argv[1], int(sys.argv[2])
app = DomainDispatcherApplication(create_backend_app)
run_simple(host, port, app, threaded=False, request_handler=MotoRequestHandler)
"""


def start_s3(tmp_dir: str | os.PathLike[str], bucket: str = "imagegen-test") -> S3Service:
    """moto's S3 server (a subprocess) on 127.0.0.1 and a free port, with ``bucket`` created."""
    missing = [
        module
        for module in ("moto", "flask", "flask_cors", "boto3")  # moto's server needs flask
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        raise ServiceUnavailable("s3 (moto)", f"missing {missing} (pip install 'moto[server]')")
    import boto3

    tmp_dir = Path(tmp_dir)

    def start(port: int) -> S3Service:
        url = f"http://{LOCALHOST}:{port}"
        log_path = tmp_dir / f"moto-{port}.log"
        with contextlib.ExitStack() as cleanup:
            env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
            env.update(s3_client_env(url), PYTHONUNBUFFERED="1")
            env.pop("AWS_ENDPOINT_URL")
            env.pop("AWS_ENDPOINT_URL_S3")
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    [sys.executable, "-c", MOTO_ONE_REQUEST_AT_A_TIME, LOCALHOST, str(port)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=tmp_dir,
                )
            cleanup.callback(_terminate, process)

            def answers() -> bool:
                with urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=2) as response:
                    return response.status == 200

            _wait_until(answers, what="moto_server", timeout=60, process=process, log_path=log_path)
            client = boto3.client(
                "s3",
                endpoint_url=url,
                aws_access_key_id=S3_FAKE_KEY,
                aws_secret_access_key=S3_FAKE_SECRET,
                region_name=S3_REGION,
            )
            client.create_bucket(Bucket=bucket)
            service = S3Service(
                "s3",
                url,
                process=process,
                log_path=log_path,
                params={"host": LOCALHOST, "port": port, "bucket": bucket},
                env=s3_client_env(url),
                cleanup=cleanup.pop_all(),
            )
            return service
        raise AssertionError("unreachable")

    return _retrying_port(start)  # type: ignore[return-value]


# --- Celery workers -------------------------------------------------------------------------


def write_celery_worker_config(
    path: str | os.PathLike[str],
    broker_url: str,
    backend_url: str | None = None,
    config_source: Mapping[str, Any] | None = None,
) -> Path:
    """The ``-y`` file of ``dagster-celery worker start``: the celery executor's config block.

    It must match the ``execution: config:`` the job's celery executor runs with (broker,
    backend, config_source); dagster-celery writes it into a ``dagster_celery_config`` module
    the worker imports.
    """
    import yaml

    config: dict[str, Any] = {"broker": broker_url, "backend": backend_url or broker_url}
    if config_source:
        config["config_source"] = dict(config_source)
    path = Path(path)
    path.write_text(yaml.safe_dump({"execution": {"config": config}}, sort_keys=False))
    return path


def start_celery_worker(
    tmp_dir: str | os.PathLike[str],
    *,
    broker_url: str,
    dagster_home: str | os.PathLike[str],
    name: str,
    queues: Iterable[str] = (),
    backend_url: str | None = None,
    config_source: Mapping[str, Any] | None = None,
    concurrency: int = 1,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    pythonpath: Iterable[str | os.PathLike[str]] = (),
    loglevel: str = "INFO",
    ready_timeout: float = 90,
    config_path: str | os.PathLike[str] | None = None,
    includes: Iterable[str] = (),
) -> CeleryWorker:
    """``dagster-celery worker start`` for ``queues`` (default: dagster-celery's ``dagster``
    queue), node name ``name@HOSTNAME``, prefork pool of ``concurrency`` processes.

    The worker gets ``DAGSTER_HOME`` (it loads the instance from there, so its dagster.yaml must
    reach the same run storage as the orchestrator), ``env`` on top of this process's
    environment and ``pythonpath`` (plus ``cwd``) prepended to ``PYTHONPATH`` so it can import
    the job's module. ``config_path`` uses an existing ``-y`` file (e.g. deploy/celery/
    worker.yaml) instead of writing one from broker_url/backend_url/config_source. Returns once
    the worker logs that it is ready. ``includes`` are modules the worker imports before it
    forks its pool (``-i``): the pool processes start with them loaded.
    """
    executable = _venv_executable("dagster-celery")
    if executable is None:
        raise ServiceUnavailable("celery worker", "no dagster-celery executable (pip install)")
    tmp_dir = Path(tmp_dir)
    queues = list(queues) or [CELERY_DEFAULT_QUEUE]
    hostname = f"{name}@{socket.gethostname()}"  # what celery's "%h" expands to
    if config_path is None:
        config_path = write_celery_worker_config(
            tmp_dir / f"celery-worker-{name}.yaml", broker_url, backend_url, config_source
        )
    log_path = tmp_dir / f"celery-worker-{name}.log"
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    worker_env = dict(os.environ)
    worker_env.update(env or {})
    paths = [str(cwd), *(str(p) for p in pythonpath)]
    if worker_env.get("PYTHONPATH"):
        paths.append(worker_env["PYTHONPATH"])
    worker_env.update(
        DAGSTER_HOME=str(dagster_home),
        PYTHONPATH=os.pathsep.join(paths),
        PYTHONUNBUFFERED="1",
        # dagster-celery runs `celery` from PATH: the virtualenv's bin must be on it
        PATH=os.pathsep.join([str(Path(executable).parent), worker_env.get("PATH", "")]),
    )
    queue_args = [arg for queue in queues for arg in ("-q", queue)]
    include_args = [arg for module in includes for arg in ("-i", module)]
    command = [
        executable,
        "worker",
        "start",
        "-A",
        "dagster_celery.app",
        "-y",
        str(config_path),
        "-n",
        name,
        "-l",
        loglevel,
        *queue_args,
        *include_args,
        "--",  # the rest goes to `celery worker`
        f"--concurrency={concurrency}",
        "--pool=prefork",
        "--without-gossip",
        "--without-mingle",
    ]

    # the log is appended to (a restarted worker of the same name keeps one log): look for the
    # ready line only in what this start writes
    offset = log_path.stat().st_size if log_path.exists() else 0
    with contextlib.ExitStack() as cleanup:
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=worker_env,
                cwd=cwd,
                start_new_session=True,  # its own process group: stop() reaches pool children
            )
        pgid = process.pid
        cleanup.callback(_stop_group, process, pgid)

        def ready() -> bool:
            with log_path.open("rb") as log:
                log.seek(offset)
                return f"{hostname} ready.".encode() in log.read()

        _wait_until(
            ready,
            what=f"celery worker {hostname}",
            timeout=ready_timeout,
            process=process,
            log_path=log_path,
            interval=0.2,
        )
        return CeleryWorker(
            "celery worker",
            broker_url,
            process=process,
            log_path=log_path,
            params={
                "hostname": hostname,
                "queues": queues,
                "pgid": pgid,
                "config_path": str(config_path),
            },
            env=worker_env,
            cleanup=cleanup.pop_all(),
        )
    raise AssertionError("unreachable")


# --- Dagster on these services --------------------------------------------------------------


def write_dagster_home(
    home: str | os.PathLike[str],
    postgres: RunningService,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """A DAGSTER_HOME whose dagster.yaml keeps runs, events and schedules in ``postgres``
    (dagster_postgres ``postgres_db``), telemetry off, plus ``extra`` top-level sections."""
    import yaml

    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "storage": postgres_storage_config(postgres),
        "telemetry": {"enabled": False},
        **dict(extra or {}),
    }
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return home


def celery_workers_by_step(instance: Any, run_id: str) -> dict[str, list[str]]:
    """{step key: [celery worker hostname, ...]} from a run's event log.

    dagster-celery's task reports, when it starts a step in a worker, an engine event "Executing
    steps STEP in celery worker" with metadata "Celery worker" = the worker's node name (its
    ``-n NAME@%h``) and the step key on the event. A step executed twice (a task redelivered
    after its worker died) lists both workers, in order.
    """
    from dagster import DagsterEventType

    by_step: dict[str, list[str]] = {}
    records = instance.get_records_for_run(
        run_id, of_type=DagsterEventType.ENGINE_EVENT, limit=100_000
    ).records
    for record in records:
        event = record.event_log_entry.dagster_event
        metadata = event.engine_event_data.metadata if event.engine_event_data else {}
        worker = metadata.get("Celery worker")
        if worker is not None and event.step_key is not None:
            by_step.setdefault(event.step_key, []).append(str(worker.value))
    return by_step


def postgres_env(postgres: RunningService, database: str | None = None) -> dict[str, str]:
    """The DAGSTER_PG_* variables deploy/celery/dagster.yaml reads its connection from (the
    server's own database, or ``database``)."""
    params = postgres.params
    return {
        "DAGSTER_PG_HOST": str(params["host"]),
        "DAGSTER_PG_PORT": str(params["port"]),
        "DAGSTER_PG_USER": str(params["user"]),
        "DAGSTER_PG_PASSWORD": str(params["password"]),
        "DAGSTER_PG_DB": database or str(params["db"]),
    }


def create_database(postgres: RunningService, name: str) -> None:
    """A new, empty database on ``postgres``: a Dagster instance of its own on a shared server
    (no run, pool slot or event of another instance in it)."""
    import psycopg2

    params = postgres.params
    connection = psycopg2.connect(
        host=params["host"],
        port=params["port"],
        user=params["user"],
        password=params["password"],
        dbname=params["db"],
    )
    connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        connection.close()


# --- Runs of a Definitions' jobs, orchestrated in a subprocess ------------------------------
#
# ``execute_job`` orchestrates a run in the calling process: with the celery executor that
# process submits the tasks and waits for them. Running it in a subprocess lets a test bound it
# (timeout), interrupt it (SIGTERM: the executor revokes its tasks and the run fails) and read
# the environment the Definitions pick their executor from.

RUN_JOBS = "from tests.services import run_jobs_main; run_jobs_main()"


def run_jobs_main(argv: list[str] | None = None) -> None:
    """Execute runs of jobs of a Definitions object, one after another, in this process.

    ``--module M [--attribute defs] --runs JSON`` where JSON is a list of
    ``{"job": name, "tags": {...}, "run_config": {...}, "asset_selection": ["a/b", ...],
    "from_failure": parent_run_id}`` (all but "job" optional). The instance is $DAGSTER_HOME's.
    Prints one JSON line per run (``index``, ``run_id``, ``success``, ``seconds``); exits 1 when
    a run failed. SIGTERM becomes an interrupt, as in Dagster's own CLI.
    """
    import argparse
    import json

    import dagster as dg
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._utils.interrupts import setup_interrupt_handlers

    parser = argparse.ArgumentParser()
    parser.add_argument("--module", required=True)
    parser.add_argument("--attribute", default="defs")
    parser.add_argument("--runs", required=True)
    args = parser.parse_args(argv)
    setup_interrupt_handlers()
    repository = ReconstructableRepository.for_module(
        args.module, args.attribute, working_directory=os.getcwd()
    )
    all_succeeded = True
    with dg.DagsterInstance.get() as instance:
        for index, spec in enumerate(json.loads(args.runs)):
            options = None
            if spec.get("from_failure"):
                options = dg.ReexecutionOptions.from_failure(spec["from_failure"], instance)
            selection = [
                dg.AssetKey.from_user_string(key) for key in spec.get("asset_selection", [])
            ]
            started = time.perf_counter()
            result = dg.execute_job(
                repository.get_reconstructable_job(spec["job"]),
                instance=instance,
                run_config=spec.get("run_config") or None,
                tags=spec.get("tags") or {},
                reexecution_options=options,
                asset_selection=selection or None,
            )
            seconds = time.perf_counter() - started
            all_succeeded &= result.success
            line = {"index": index, "run_id": result.run_id, "success": result.success}
            print(json.dumps({**line, "seconds": round(seconds, 3)}), flush=True)
    sys.exit(0 if all_succeeded else 1)


class JobRuns:
    """A subprocess executing runs (:func:`run_jobs_main`); its output goes to ``log_path``."""

    def __init__(
        self,
        runs: list[Mapping[str, Any]],
        *,
        module: str,
        env: Mapping[str, str],
        cwd: str | os.PathLike[str],
        log_path: str | os.PathLike[str],
    ) -> None:
        import json

        self.log_path = Path(log_path)
        command = [sys.executable, "-c", RUN_JOBS, "--module", module, "--runs", json.dumps(runs)]
        paths = [str(cwd), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                command,
                cwd=cwd,
                env={**env, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def results(self) -> list[dict[str, Any]]:
        """The runs finished so far: ``{"index", "run_id", "success", "seconds"}`` each."""
        import json

        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith('{"index"'):
                found.append(json.loads(line))
        return found

    def wait(self, timeout: float) -> list[dict[str, Any]]:
        """Wait for the process to end (killing it after ``timeout`` s and raising)."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(
                f"runs did not finish in {timeout:.0f} s:\n{self.log_tail()}"
            ) from None
        return self.results()

    def interrupt(self) -> None:
        """SIGTERM: the executor revokes its tasks and the run ends as failed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the process group (nothing is left running)."""
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]
