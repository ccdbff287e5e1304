"""Real Redis, PostgreSQL and S3 (moto) servers on 127.0.0.1, one of each per test session.

A fixture whose service cannot run on this machine (binary or package missing) skips the tests
that use it with the reason; a service that is installed but does not start fails them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.services import (
    RunningService,
    S3Service,
    ServiceUnavailable,
    start_postgres,
    start_redis,
    start_s3,
)


def _serve(start: Callable[[Path], RunningService], tmp_dir: Path) -> Iterator[RunningService]:
    try:
        service = start(tmp_dir)
    except ServiceUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="session")
def redis_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    """A Redis server: ``.url`` is ``redis://127.0.0.1:PORT/0``."""
    yield from _serve(start_redis, tmp_path_factory.mktemp("redis"))


@pytest.fixture(scope="session")
def postgres_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    """A PostgreSQL server with database ``dagster``: ``.url``, ``.params``."""
    yield from _serve(start_postgres, tmp_path_factory.mktemp("postgres"))


@pytest.fixture(scope="session")
def s3_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Service]:
    """A moto S3 server with one bucket: ``.url``, ``.bucket``, ``.env``, ``.storage_options``."""
    yield from _serve(start_s3, tmp_path_factory.mktemp("s3"))  # type: ignore[misc]
