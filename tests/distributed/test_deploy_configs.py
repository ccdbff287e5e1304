"""The deployment drafts under deploy/ are valid: YAML, and what their consumers accept."""

from __future__ import annotations

import shutil
import tomllib
import uuid
from pathlib import Path

import pytest
import yaml

from tests.services import RunningService, ServiceUnavailable, start_celery_worker

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = PROJECT_ROOT / "deploy"
DEPLOY_FILES = [
    DEPLOY / "celery" / "dagster.yaml",
    DEPLOY / "celery" / "worker.yaml",
    DEPLOY / "kubernetes" / "values.yaml",
]


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_deploy_file_is_yaml_mapping(path: Path) -> None:
    assert isinstance(yaml.safe_load(path.read_text()), dict)


def test_celery_instance_matches_the_one_machine_limits() -> None:
    local = yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text())
    celery = yaml.safe_load((DEPLOY / "celery" / "dagster.yaml").read_text())
    assert celery["concurrency"] == local["concurrency"]
    assert celery["run_monitoring"] == local["run_monitoring"]


def test_celery_instance_loads_against_postgres(
    postgres_service: RunningService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dagster as dg
    from dagster_postgres import (
        PostgresEventLogStorage,
        PostgresRunStorage,
        PostgresScheduleStorage,
    )

    params = postgres_service.params
    for name, value in {
        "DAGSTER_PG_HOST": params["host"],
        "DAGSTER_PG_PORT": str(params["port"]),
        "DAGSTER_PG_USER": params["user"],
        "DAGSTER_PG_PASSWORD": params["password"],
        "DAGSTER_PG_DB": params["db"],
    }.items():
        monkeypatch.setenv(name, value)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(DEPLOY / "celery" / "dagster.yaml", home / "dagster.yaml")

    instance = dg.DagsterInstance.from_config(str(home))
    try:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 4
        assert instance.run_monitoring_enabled
        # the storage really works: a run is written to and read back from PostgreSQL
        run = instance.add_run(dg.DagsterRun(job_name="deploy_check", run_id=str(uuid.uuid4())))
        assert instance.get_run_by_id(run.run_id).job_name == "deploy_check"
        instance.delete_run(run.run_id)
    finally:
        instance.dispose()


def test_celery_worker_starts_with_the_worker_config(
    redis_service: RunningService, postgres_service: RunningService, tmp_path: Path
) -> None:
    """`dagster-celery worker start -y deploy/celery/worker.yaml` resolves the broker from
    IMAGEGEN_CELERY_BROKER and comes up on the real Redis."""
    pytest.importorskip("dagster_celery")
    from dagster_celery.cli import get_validated_config

    from tests.services import write_dagster_home

    env = {"IMAGEGEN_CELERY_BROKER": redis_service.url}
    config_path = DEPLOY / "celery" / "worker.yaml"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMAGEGEN_CELERY_BROKER", redis_service.url)
        config = get_validated_config(str(config_path))
    assert config["broker"] == config["backend"] == redis_service.url
    assert config["config_source"]["worker_prefetch_multiplier"] == 1
    assert config["config_source"]["worker_disable_prefetch"] is True

    home = write_dagster_home(tmp_path / "dagster_home", postgres_service)
    try:
        worker = start_celery_worker(
            tmp_path,
            broker_url=redis_service.url,
            dagster_home=home,
            name=f"deploy-{uuid.uuid4().hex[:4]}",
            env=env,
            cwd=PROJECT_ROOT,
            config_path=config_path,
        )
    except ServiceUnavailable as exc:
        pytest.skip(str(exc))
    try:
        assert worker.alive()
        assert len(worker.pool_pids()) == 1
    finally:
        worker.stop()
    assert not worker.alive()


def test_helm_values_point_at_this_project() -> None:
    values = yaml.safe_load((DEPLOY / "kubernetes" / "values.yaml").read_text())
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    args = deployment["dagsterApiGrpcArgs"]
    assert args[args.index("--module-name") + 1] == pyproject["tool"]["dagster"]["module_name"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert "k8sRunLauncher" in values["runLauncher"]["config"]
    assert values["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"
    assert values["concurrency"]["pools"]["defaultLimit"] == 1
