"""Each real service of the distributed tests works for real, and stops cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from tests.services import (
    RunningService,
    S3Service,
    ServiceStartError,
    ServiceUnavailable,
    start_redis,
)


def test_redis_ping_set_get(redis_service: RunningService) -> None:
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(redis_service.url)
    try:
        assert client.ping()
        assert client.set("imagegen:key", "value")
        assert client.get("imagegen:key") == b"value"
        # no persistence: nothing is configured to save
        assert client.config_get("save")["save"] == ""
        assert client.config_get("appendonly")["appendonly"] == "no"
    finally:
        client.close()


def test_postgres_connect_create_table(postgres_service: RunningService) -> None:
    psycopg2 = pytest.importorskip("psycopg2")
    params = postgres_service.params
    assert postgres_service.url == (
        f"postgresql://{params['user']}@127.0.0.1:{params['port']}/{params['db']}"
    )
    with psycopg2.connect(postgres_service.url) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE smoke (id serial PRIMARY KEY, name text)")
        cur.execute("INSERT INTO smoke (name) VALUES (%s) RETURNING id", ("x",))
        assert cur.fetchone() == (1,)
        cur.execute("SELECT name FROM smoke")
        assert cur.fetchall() == [("x",)]
        cur.execute("SHOW listen_addresses")
        assert cur.fetchone() == ("127.0.0.1",)
        cur.execute("DROP TABLE smoke")


def test_s3_round_trip_with_storage_options(s3_service: S3Service) -> None:
    s3fs = pytest.importorskip("s3fs")
    upath = pytest.importorskip("upath")
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_service.storage_options)
    prefix = f"{s3_service.bucket}/smoke-{uuid.uuid4().hex[:8]}"
    fs.pipe(f"{prefix}/a.bin", b"\x00\x01payload")
    assert fs.ls(prefix) == [f"{prefix}/a.bin"]
    assert fs.cat(f"{prefix}/a.bin") == b"\x00\x01payload"

    path = upath.UPath(f"s3://{prefix}/sub/b.txt", **s3_service.storage_options)
    path.write_text("hello")
    assert path.read_text() == "hello"
    assert [p.name for p in path.parent.iterdir()] == ["b.txt"]


def test_s3_reached_through_environment_variables(s3_service: S3Service) -> None:
    """With only ``.env`` set (AWS_ENDPOINT_URL and fake keys), plain clients reach the server:
    what a worker process or the project's code gets without any storage_options."""
    pytest.importorskip("s3fs")
    key = f"env-{uuid.uuid4().hex[:8]}.txt"
    code = (
        "import boto3, s3fs, upath, sys\n"
        f"bucket, key = {s3_service.bucket!r}, {key!r}\n"
        "upath.UPath(f's3://{bucket}/{key}').write_text('via env')\n"
        "fs = s3fs.S3FileSystem()\n"
        "assert fs.cat(f'{bucket}/{key}') == b'via env'\n"
        "body = boto3.client('s3').get_object(Bucket=bucket, Key=key)['Body'].read()\n"
        "assert body == b'via env', body\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(s3_service.env)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_services_stop_and_failed_start_cleans_up(tmp_path: Path) -> None:
    try:
        redis = start_redis(tmp_path)
    except ServiceUnavailable as exc:
        pytest.skip(str(exc))
    process = redis.process
    assert process is not None
    redis.stop()
    assert process.poll() is not None
    redis.stop()  # idempotent


def test_unavailable_service_names_itself(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server on PATH
    with pytest.raises(ServiceUnavailable, match="redis"):
        start_redis(tmp_path)


def test_port_taken_fails_loudly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A server that cannot bind is a ServiceStartError (after retries), not a skip, and leaves
    no process behind."""
    import socket

    import tests.services as services

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    monkeypatch.setattr(services, "free_port", lambda: taken)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        with pytest.raises((ServiceStartError, ServiceUnavailable)) as info:
            start_redis(tmp_path)
        if info.type is ServiceUnavailable:
            pytest.skip(str(info.value))
        assert "redis-server" in str(info.value)
    finally:
        blocker.close()
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before  # the failed starts left no process behind
