"""The project's own jobs on the celery executor, end to end, with real components.

Started once for this module (session fixtures in conftest.py for the servers): Redis (the
broker and result backend), PostgreSQL (the Dagster instance, deploy/celery/dagster.yaml as is,
connection from DAGSTER_PG_*), a moto S3 server (every output: IMAGEGEN_STORAGE=s3://bucket/
prefix, reached through s3fs / universal-pathlib by the AWS_* variables), and two real
``dagster-celery worker start`` processes with deploy/celery/worker.yaml: one on the ``gpu``
queue, one on the default ``dagster`` queue, each with its own log and the project imported
before the pool forks (``-i``). Every run is orchestrated by ``execute_job`` in a subprocess
(tests/services.py ``JobRuns``), so it can be bounded and interrupted. All processes read one
imagegen.toml (IMAGEGEN_CONFIG: ``executor = "celery"``, the s3:// storage, the prompts folder)
and get the same environment. Models are the tiny random-weight builds, images 64 px (128 in
the kill test). The gpu pool is set to 1 slot before the first run, as at an install.

What is asserted:

- two prompt sets x both local backends: every step's worker, read back from the run's
  events, is the gpu worker for the GPU steps and the default worker for the rest, each step
  ran once; every PNG, MP4 and Parquet table expected is in the bucket, PNGs decode, each file
  matches its run-metadata row's sha256, one object per (prompt, image) slot, no temporary or
  stray object; a second materialization generates and scores nothing and leaves the objects
  as they were;
- the gpu worker SIGKILLed inside ``images.generate_on_gpu``: the run hangs (early ack: the
  task is gone) until its orchestrator gets SIGTERM, which fails it; the gpu pool slot the
  lost step held is freed (what the daemon's run monitoring does 30 s after the run ended);
  with the worker restarted, a re-execution from failure runs only the lost steps and leaves
  exactly one complete object per slot and one generation row per image;
- the warm cache: three per-partition runs of FLUX on one gpu worker load the model once
  (model_loads 1, 0, 0; model_cache_hits 0, 1, 1; worker = the gpu worker) and a run whose run
  config changes a FLUX setting loads it again.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EXAMPLE_CSV, SECOND_CSV
from tests.services import (
    CeleryWorker,
    JobRuns,
    RunningService,
    S3Service,
    ServiceUnavailable,
    celery_workers_by_step,
    create_database,
    postgres_env,
    start_celery_worker,
)

dg = pytest.importorskip("dagster")
pytest.importorskip("dagster_celery")
pytest.importorskip("dagster_postgres")
s3fs = pytest.importorskip("s3fs")

from dagster import DagsterEventType, DagsterRunStatus  # noqa: E402

from imagegen_pipeline.defs.gpu import GPU_CELERY_QUEUE, GPU_POOL  # noqa: E402
from imagegen_pipeline.defs.partitions import partition_key  # noqa: E402
from imagegen_pipeline.local_runner import range_tags  # noqa: E402
from imagegen_pipeline.run_metadata import load_run_metadata  # noqa: E402
from imagegen_pipeline.storage import Storage  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = PROJECT_ROOT / "deploy" / "celery"
DEFINITIONS = "imagegen_pipeline.definitions"
STORAGE_PREFIX = "imagegen"
REDIS_DATABASES = itertools.count(1)  # one per celery stack of this process (0: other tests)
LOCAL_BACKENDS = ("flux_schnell", "sdxl_turbo")
# The steps tagged for the gpu queue (imagegen_pipeline/defs/gpu.py); all others go to the
# default queue.
GPU_STEPS = {"images.generate_on_gpu", "quality", "clips", "video_quality"}
RUN_TIMEOUT = 300  # seconds for one orchestrator process on a busy 2-core machine
SIDE = 64
# INFO: the DEBUG stream of every event would bury the orchestrator's log
QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


pytestmark = pytest.mark.slow  # minutes: a celery stack and runs on it


def model_config(**flux: Any) -> dict[str, Any]:
    """Run config: both local backends at SIDE px, FLUX settings overridden by ``flux``."""
    size = {"width": SIDE, "height": SIDE, "batch_size": 2}
    return {
        **QUIET,
        "resources": {
            "flux_schnell": {"config": {**size, "steps": 4, **flux}},
            "sdxl_turbo": {"config": {**size, "steps": 1}},
        },
    }


def generate(prompt_sets: list[str], backend: str, **flux: Any) -> dict[str, Any]:
    """A generate_images run over ``prompt_sets`` (one range, one run) for ``backend``."""
    first, last = partition_key(prompt_sets[0], backend), partition_key(prompt_sets[-1], backend)
    return {
        "job": "generate_images",
        "tags": range_tags(str(first), str(last)),
        "run_config": model_config(**flux),
    }


def prepare(prompt_sets: list[str]) -> dict[str, Any]:
    return {
        "job": "prepare_prompts",
        "tags": range_tags(prompt_sets[0], prompt_sets[-1]),
        "run_config": QUIET,
    }


@dataclass
class Pipeline:
    """The started components and the environment every process of a run gets."""

    tmp_dir: Path
    s3: S3Service
    storage_url: str
    prompts_dir: Path
    env: dict[str, str]
    instance: Any  # DagsterInstance on PostgreSQL (deploy/celery/dagster.yaml)
    broker_url: str
    workers: list[CeleryWorker] = field(default_factory=list)  # every one started, to stop
    default_worker: CeleryWorker = field(init=False)
    gpu_worker: CeleryWorker = field(init=False)

    # --- workers and runs ---------------------------------------------------------------

    def start_worker(self, name: str, queues: list[str]) -> CeleryWorker:
        worker = start_celery_worker(
            self.tmp_dir,
            broker_url=self.broker_url,
            dagster_home=self.env["DAGSTER_HOME"],
            name=name,
            queues=queues,
            env=self.env,
            cwd=PROJECT_ROOT,
            config_path=DEPLOY / "worker.yaml",
            includes=[DEFINITIONS],  # as deploy/celery/worker.yaml recommends
        )
        self.workers.append(worker)
        return worker

    def restart_gpu_worker(self, name: str) -> CeleryWorker:
        """A new gpu worker process (a cold model cache) in place of the current one."""
        self.gpu_worker.stop()
        self.gpu_worker = self.start_worker(f"{name}-{uuid.uuid4().hex[:4]}", [GPU_CELERY_QUEUE])
        return self.gpu_worker

    def start_runs(self, runs: list[dict[str, Any]], label: str) -> JobRuns:
        return JobRuns(
            runs,
            module=DEFINITIONS,
            env=self.env,
            cwd=PROJECT_ROOT,
            log_path=self.tmp_dir / f"orchestrator-{label}-{uuid.uuid4().hex[:6]}.log",
        )

    def run(
        self,
        *batches: list[dict[str, Any]],
        label: str,
        while_running: Callable[[], None] | None = None,
    ) -> list[list[str]]:
        """Each batch in its own orchestrator process, all at once (``while_running`` is called
        once they are started); every run must succeed. Returns the run ids of each batch."""
        started = [self.start_runs(runs, f"{label}-{i}") for i, runs in enumerate(batches)]
        try:
            if while_running is not None:
                while_running()
            outcomes = [job_runs.wait(RUN_TIMEOUT) for job_runs in started]
        finally:
            for job_runs in started:
                job_runs.kill()
        for job_runs, runs, results in zip(started, batches, outcomes, strict=True):
            assert len(results) == len(runs) and all(r["success"] for r in results), (
                f"{label}: {results}\n{job_runs.log_tail()}\n{self.worker_logs()}"
            )
        return [[r["run_id"] for r in results] for results in outcomes]

    def worker_logs(self, chars: int = 3000) -> str:
        return "\n".join(
            f"--- {w.hostname} ---\n{w.log_text()[-chars:]}"
            for w in (self.default_worker, self.gpu_worker)
        )

    def add_prompt_sets(self, csvs: Mapping[str, str]) -> list[str]:
        for name, text in csvs.items():
            (self.prompts_dir / f"{name}.csv").write_text(text)
        names = list(csvs)
        self.instance.add_dynamic_partitions("prompt_sets", names)
        return names

    # --- what the runs left -------------------------------------------------------------

    def storage(self) -> Storage:
        return Storage(self.storage_url)

    def fs(self) -> Any:
        return s3fs.S3FileSystem(**self.s3.storage_options, use_listings_cache=False)

    def objects(self, under: str = "") -> dict[str, dict[str, Any]]:
        """Every object under the storage prefix (``under`` below it): key -> size and ETag."""
        root = f"{self.s3.bucket}/{STORAGE_PREFIX}/{under}".rstrip("/")
        found = self.fs().find(root, detail=True)
        return {
            key.removeprefix(f"{self.s3.bucket}/{STORAGE_PREFIX}/"): {
                "size": info["size"],
                "etag": info.get("ETag"),
            }
            for key, info in found.items()
        }

    def read(self, key: str) -> bytes:
        return self.fs().cat_file(f"{self.s3.bucket}/{STORAGE_PREFIX}/{key}")

    def status(self, run_id: str) -> DagsterRunStatus:
        return self.instance.get_run_by_id(run_id).status

    def step_rows(self, run_ids: list[str]) -> Any:
        rows = load_run_metadata(self.storage(), "steps")
        return rows[rows["run_id"].isin(run_ids)].sort_values("started_at")


@pytest.fixture(scope="module")
def pipeline(
    redis_service: RunningService,
    postgres_service: RunningService,
    s3_service: S3Service,
    tiny_model_variables: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Pipeline]:
    tmp_dir = tmp_path_factory.mktemp("celery-pipeline")
    home = tmp_dir / "dagster_home"
    home.mkdir()
    shutil.copy(DEPLOY / "dagster.yaml", home / "dagster.yaml")
    prompts_dir = tmp_dir / "prompts"
    prompts_dir.mkdir()
    storage_url = f"s3://{s3_service.bucket}/{STORAGE_PREFIX}"
    # Its own Redis and PostgreSQL databases on the session's servers: no worker, queued task,
    # run or gpu pool slot of another module using this fixture (test_celery_claims) is seen.
    host, port = redis_service.params["host"], redis_service.params["port"]
    broker_url = f"redis://{host}:{port}/{next(REDIS_DATABASES)}"
    database = f"dagster_{uuid.uuid4().hex[:8]}"
    create_database(postgres_service, database)
    pg_env = postgres_env(postgres_service, database)
    # The one configuration file every process reads (IMAGEGEN_CONFIG), as in a deployment.
    config = tmp_dir / "imagegen.toml"
    config.write_text(
        f'prompts_dir = "{prompts_dir}"\nstorage = "{storage_url}"\ndevice = "cpu"\n'
        f'backends = ["flux_schnell", "sdxl_turbo"]\nexecutor = "celery"\n'
    )
    inherited = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AWS_", "IMAGEGEN_", "DAGSTER_", "GEMINI_"))
    }
    env = {
        **inherited,
        **tiny_model_variables,
        **s3_service.env,
        **pg_env,
        "DAGSTER_HOME": str(home),
        "IMAGEGEN_CONFIG": str(config),
        "IMAGEGEN_CELERY_BROKER": broker_url,
        "HF_HUB_OFFLINE": "1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in pg_env.items():
            patch.setenv(key, value)
        for key, value in s3_service.env.items():  # this process reads the bucket too
            patch.setenv(key, value)
        # the tables exist before any worker or orchestrator connects
        instance = dg.DagsterInstance.from_config(str(home))
        workers: list[CeleryWorker] = []
        try:
            # The install step of deploy/celery/dagster.yaml: the gpu pool's limit is set
            # before the first run. Left to the default, two runs claiming it first at the same
            # moment race to create its row and one fails (dagster-io/dagster#33552).
            dagster_cli = str(Path(sys.executable).parent / "dagster")
            subprocess.run(
                [dagster_cli, "instance", "concurrency", "set", GPU_POOL, "1"],
                env=env,
                cwd=tmp_dir,
                check=True,
                capture_output=True,
                timeout=120,
            )
            assert instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count == 1
            pipe = Pipeline(
                tmp_dir, s3_service, storage_url, prompts_dir, env, instance, broker_url, workers
            )
            try:
                pipe.default_worker = pipe.start_worker(f"default-{uuid.uuid4().hex[:4]}", [])
                pipe.gpu_worker = pipe.start_worker(
                    f"gpu-{uuid.uuid4().hex[:4]}", [GPU_CELERY_QUEUE]
                )
            except ServiceUnavailable as exc:
                pytest.skip(str(exc))
            yield pipe
        finally:
            for worker in workers:
                worker.stop()
            instance.dispose()


def wait_for(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    context: Callable[[], str] = lambda: "",
) -> float:
    """Poll until ``predicate()``; the seconds it took; on timeout fail with ``context()``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{context()}")
        time.sleep(0.1)
    return time.monotonic() - start


def events(instance: Any, run_id: str, event_type: DagsterEventType) -> list[Any]:
    records = instance.get_records_for_run(run_id, of_type=event_type, limit=10_000).records
    return [record.event_log_entry.dagster_event for record in records]


def executed_steps(instance: Any, run_id: str) -> list[str]:
    return [event.step_key for event in events(instance, run_id, DagsterEventType.STEP_START)]


def assert_placement(pipe: Pipeline, run_id: str) -> dict[str, list[str]]:
    """Every step of the run ran once, GPU steps on the gpu worker, the rest on the default."""
    placed = celery_workers_by_step(pipe.instance, run_id)
    started = executed_steps(pipe.instance, run_id)
    assert sorted(placed) == sorted(started), (placed, started)
    expected = {
        step: [pipe.gpu_worker.hostname if step in GPU_STEPS else pipe.default_worker.hostname]
        for step in started
    }
    assert placed == expected
    return placed


# --- objects in the bucket --------------------------------------------------------------------

PNG_NAME = re.compile(
    r"^images/(?P<set>[^/]+)/(?P<backend>[^/]+)/(?P<prompt>[^/]+)/(?P<index>\d+)_[0-9a-f]{16}\.png$"
)
MP4_NAME = re.compile(
    r"^clips/(?P<set>[^/]+)/(?P<backend>[^/]+)/(?P<prompt>[^/]+)/(?P<index>\d+)_[0-9a-f]{16}\.mp4$"
)


def slots(keys: list[str], pattern: re.Pattern[str]) -> Counter[tuple[str, str, str, int]]:
    """(set, backend, prompt id, index) of each matching key, counted."""
    found: Counter[tuple[str, str, str, int]] = Counter()
    for key in keys:
        match = pattern.match(key)
        if match:
            found[(match["set"], match["backend"], match["prompt"], int(match["index"]))] += 1
    return found


def assert_no_stray_objects(keys: list[str]) -> None:
    """No temporary, hidden or half-named object anywhere under the prefix."""
    stray = [
        key
        for key in keys
        if Path(key).name.startswith(".") or ".tmp" in key or not Path(key).suffix
    ]
    assert not stray, stray


def assert_pngs_complete(pipe: Pipeline, keys: list[str], side: int = SIDE) -> None:
    """Each PNG decodes whole, is ``side`` px, and is the file its generation row describes."""
    from PIL import Image

    rows = load_run_metadata(pipe.storage(), "images")
    made = rows[rows["status"] == "ok"]
    by_path = {
        path.removeprefix(f"{pipe.storage_url}/"): sha
        for path, sha in zip(made["path"], made["sha256"], strict=True)
    }
    for key in keys:
        data = pipe.read(key)
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # a truncated file fails here
            assert image.size == (side, side), key
        assert by_path.get(key) == hashlib.sha256(data).hexdigest(), key


# --- the tests --------------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_two_prompt_sets_both_backends_on_celery_with_outputs_on_s3(pipeline: Pipeline) -> None:
    pipe = pipeline
    sets = pipe.add_prompt_sets({"example": EXAMPLE_CSV, "second": SECOND_CSV})
    started = time.monotonic()
    ((prepared,),) = pipe.run([prepare(sets)], label="prepare")
    flux, sdxl = pipe.run(
        [generate(sets, "flux_schnell")], [generate(sets, "sdxl_turbo")], label="generate"
    )
    ((compared,),) = pipe.run(
        [{"job": "compare_backends", "tags": range_tags(sets[0], sets[-1]), "run_config": QUIET}],
        label="compare",
    )
    first_seconds = time.monotonic() - started
    generate_runs = [*flux, *sdxl]

    # every step's worker, from the events alone
    for run_id in [prepared, *generate_runs, compared]:
        assert_placement(pipe, run_id)
    assert set(executed_steps(pipe.instance, flux[0])) >= GPU_STEPS | {"images.generate_with_apis"}
    rows = pipe.step_rows(generate_runs)
    assert set(rows["worker"]) == {pipe.gpu_worker.hostname}
    assert len(rows) == 4 * 2 * len(sets)  # 4 model steps x 2 backends x 2 sets

    # the outputs, read from the bucket
    objects = pipe.objects()
    keys = sorted(objects)
    assert_no_stray_objects(keys)
    # example.csv: cat x2, city, owl (flux only); second.csv: two prompts x1
    expected_images = {
        ("example", "flux_schnell"): 4,
        ("example", "sdxl_turbo"): 3,
        ("second", "flux_schnell"): 2,
        ("second", "sdxl_turbo"): 2,
    }
    png_slots = slots(keys, PNG_NAME)
    assert set(png_slots.values()) == {1}, "two objects for one image slot"
    per_partition = Counter((s, b) for s, b, _, _ in png_slots)
    assert per_partition == expected_images
    pngs = [key for key in keys if key.endswith(".png") and key.startswith("images/")]
    assert len(pngs) == sum(expected_images.values())
    assert_pngs_complete(pipe, pngs)
    # one clip (MP4 + animated WebP preview) per prompt: the first image of each
    clip_slots = slots(keys, MP4_NAME)
    assert set(clip_slots.values()) == {1}
    assert Counter((s, b) for s, b, _, _ in clip_slots) == {
        ("example", "flux_schnell"): 3,
        ("example", "sdxl_turbo"): 2,
        ("second", "flux_schnell"): 2,
        ("second", "sdxl_turbo"): 2,
    }
    clips = load_run_metadata(pipe.storage(), "clips")
    clip_sha = dict(zip(clips["path"], clips["sha256"], strict=True))
    for s, b, prompt, index in clip_slots:
        (key,) = [
            k
            for k in keys
            if k.startswith(f"clips/{s}/{b}/{prompt}/{index:02d}_") and k.endswith(".mp4")
        ]
        data = pipe.read(key)
        assert data[4:8] == b"ftyp", key  # an MP4 container
        assert clip_sha[f"{pipe.storage_url}/{key}"] == hashlib.sha256(data).hexdigest()
        assert key.removesuffix(".mp4") + ".webp" in objects
    # every asset table, one Parquet per partition, readable
    import pandas as pd

    tables = [
        f"tables/{asset}/{s}.parquet"
        for asset in ("prompts", "rejected_prompts", "enhanced_prompts", "backend_comparison")
        for s in sets
    ]
    tables += [
        f"tables/{asset}/{b}/{s}.parquet"
        for asset in ("images", "quality", "keepers", "clips", "video_quality")
        for b in LOCAL_BACKENDS
        for s in sets
    ]
    for key in tables:
        table = pd.read_parquet(io.BytesIO(pipe.read(key)))
        assert len(table) or "rejected" in key, key
    images_table = pd.read_parquet(
        io.BytesIO(pipe.read("tables/images/flux_schnell/example.parquet"))
    )
    assert list(images_table["status"]) == ["ok"] * 4
    for s in sets:
        assert f"reports/{s}/gallery.html" in objects
    metadata_parts = [k for k in keys if k.startswith("run_metadata/")]
    assert metadata_parts and all(k.endswith(".parquet") for k in metadata_parts)

    # a second materialization generates nothing and leaves every object as it was
    started = time.monotonic()
    again = [
        r
        for batch in pipe.run(
            [generate(sets, "flux_schnell")], [generate(sets, "sdxl_turbo")], label="again"
        )
        for r in batch
    ]
    second_seconds = time.monotonic() - started
    for run_id in again:
        assert_placement(pipe, run_id)
    rows = pipe.step_rows(again)
    assert len(rows) == 4 * 2 * len(sets)
    assert rows["generated"].sum() == 0, rows[["asset", "prompt_set", "backend", "generated"]]
    assert (rows["skipped_existing"] == rows["requested"]).all()
    assert rows["model_loads"].sum() == 0
    after = pipe.objects()
    new = sorted(set(after) - set(objects))
    assert all(k.startswith(("run_metadata/", "steps/")) for k in new), new
    media = [k for k in objects if k.startswith(("images/", "clips/"))]
    assert {k: after[k] for k in media} == {k: objects[k] for k in media}
    made = load_run_metadata(pipe.storage(), "images")
    ok = made[made["status"] == "ok"]
    assert ok["image_id"].is_unique and len(ok) == sum(expected_images.values())
    print(
        f"\ntwo prompt sets x two backends on celery: first materialization {first_seconds:.1f} s,"
        f" second (nothing to do) {second_seconds:.1f} s"
    )


KILL_PROMPTS, KILL_IMAGES = 6, 4
KILL_SIDE = 128  # bigger images, one per pipeline call: the images step lasts long enough


@pytest.mark.timeout(600)
def test_gpu_worker_killed_mid_step_then_reexecution_leaves_no_corrupt_or_duplicate_object(
    pipeline: Pipeline,
) -> None:
    pipe = pipeline
    rows = [
        f"k{i},a paper boat number {i} on a pond,none,{KILL_IMAGES}" for i in range(KILL_PROMPTS)
    ]
    sets = pipe.add_prompt_sets({"killme": "prompt_id,prompt,style,num_images\n" + "\n".join(rows)})
    planned = KILL_PROMPTS * KILL_IMAGES
    spec = generate(sets, "flux_schnell", batch_size=1, width=KILL_SIDE, height=KILL_SIDE)
    spec["tags"] = {**spec["tags"], "test/label": f"kill-{uuid.uuid4().hex[:6]}"}
    folder = "images/killme/flux_schnell/"
    killed_gpu = pipe.gpu_worker
    orchestrator = pipe.start_runs([prepare(sets), spec], "kill")
    try:
        runs: list[Any] = []

        def created() -> bool:
            runs[:] = pipe.instance.get_runs(filters=dg.RunsFilter(tags=spec["tags"]))
            return bool(runs)

        wait_for(created, RUN_TIMEOUT, "the run to be created", orchestrator.log_tail)
        run_id = runs[0].run_id

        def pngs() -> list[str]:
            return sorted(k for k in pipe.objects(folder) if k.endswith(".png"))

        # the gpu worker is inside images.generate_on_gpu once its first PNG is in the bucket
        wait_for(lambda: len(pngs()) >= 1, RUN_TIMEOUT, "the first PNG", orchestrator.log_tail)
        killed_gpu.kill()
        made_before_kill = pngs()
        assert 1 <= len(made_before_kill) < planned, "the kill must land mid-step"
        assert "images.generate_on_gpu" in executed_steps(pipe.instance, run_id)
        succeeded = [
            e.step_key for e in events(pipe.instance, run_id, DagsterEventType.STEP_SUCCESS)
        ]
        assert "images.generate_on_gpu" not in succeeded

        # early ack: the task died with the worker and nothing will finish the run
        time.sleep(3)
        assert pipe.status(run_id) == DagsterRunStatus.STARTED
        assert orchestrator.process.poll() is None
        # SIGTERM to the orchestrator: the executor revokes its tasks, the run fails at once
        orchestrator.interrupt()
        took = wait_for(
            lambda: pipe.status(run_id) == DagsterRunStatus.FAILURE,
            60,
            "the run to fail",
            orchestrator.log_tail,
        )
        orchestrator.wait(60)
        # The lost step still holds its gpu pool slot (deploy/celery/dagster.yaml: 1): a
        # re-execution would wait for it forever. The daemon's run monitoring frees it
        # free_slots_after_run_end_seconds (30) after the run ended; do that here.
        held = pipe.instance.event_log_storage.get_concurrency_info(GPU_POOL).claimed_slots
        assert [(s.run_id, s.step_key) for s in held] == [(run_id, "images.generate_on_gpu")]
        pipe.instance.event_log_storage.free_concurrency_slots_for_run(run_id)
    finally:
        orchestrator.kill()

    restarted = pipe.restart_gpu_worker("gpu-restarted")
    retry_spec = {**spec, "from_failure": run_id}
    ((retry,),) = pipe.run([retry_spec], label="kill-retry")
    assert pipe.instance.get_run_by_id(retry).parent_run_id == run_id
    placed = assert_placement(pipe, retry)
    # only what had not finished ran again, on the restarted worker
    assert placed["images.generate_on_gpu"] == [restarted.hostname]
    assert "images.generate_with_apis" not in placed
    assert set(placed) >= GPU_STEPS

    # exactly one complete object per image slot, each the file of its one generation row
    objects = pipe.objects()
    keys = sorted(objects)
    assert_no_stray_objects(keys)
    png_slots = slots(keys, PNG_NAME)
    kill_slots = {slot: n for slot, n in png_slots.items() if slot[0] == "killme"}
    assert len(kill_slots) == planned and set(kill_slots.values()) == {1}
    kill_pngs = [k for k in keys if k.startswith(folder) and k.endswith(".png")]
    assert set(made_before_kill) <= set(kill_pngs)
    assert_pngs_complete(pipe, kill_pngs, side=KILL_SIDE)
    made = load_run_metadata(pipe.storage(), "images", prompt_set="killme", backend="flux_schnell")
    ok = made[made["status"] == "ok"]
    assert ok["image_id"].is_unique and len(ok) == planned
    step = pipe.step_rows([retry])
    images_row = step[step["asset"] == "images"].iloc[0]
    assert images_row["skipped_existing"] == len(made_before_kill)
    assert images_row["generated"] == planned - len(made_before_kill)
    assert (
        len([k for k in keys if k.startswith("clips/killme/") and k.endswith(".mp4")])
        == KILL_PROMPTS
    )
    print(
        f"\nkill: {len(made_before_kill)} of {planned} PNGs were in the bucket at the SIGKILL; "
        f"the run failed {took:.1f} s after SIGTERM to its orchestrator; the re-execution made "
        f"the other {images_row['generated']} in {images_row['seconds']:.1f} s"
    )


def images_only(prompt_set: str, **flux: Any) -> dict[str, Any]:
    """A run of the images asset alone for one prompt set x FLUX partition."""
    key = str(partition_key(prompt_set, "flux_schnell"))
    return {
        "job": "generate_images",
        "tags": range_tags(key, key),
        "asset_selection": ["images"],
        "run_config": model_config(**flux),
    }


@pytest.mark.timeout(600)
def test_warm_cache_loads_once_per_backend_on_one_worker_and_again_after_a_config_change(
    pipeline: Pipeline,
) -> None:
    pipe = pipeline
    gpu = pipe.restart_gpu_worker("gpu-warm")  # a new process: nothing loaded yet
    sets = pipe.add_prompt_sets({f"warm_{c}": f"prompt\na warm {c} teapot\n" for c in "abc"})
    runs = [images_only(s, steps=4) for s in sets] + [images_only(sets[0], steps=3)]
    ((_, *run_ids),) = pipe.run([prepare(sets), *runs], label="warm")

    for run_id in run_ids:
        assert celery_workers_by_step(pipe.instance, run_id)["images.generate_on_gpu"] == [
            gpu.hostname
        ]
    rows = pipe.step_rows(run_ids)
    assert list(rows["asset"]) == ["images"] * 4
    assert list(rows["run_id"]) == run_ids
    assert list(rows["worker"]) == [gpu.hostname] * 4
    assert (rows["generated"] == 1).all()
    # one load for the three runs of one configuration; a changed setting loads again
    assert list(rows["model_loads"]) == [1, 0, 0, 1]
    assert list(rows["model_cache_hits"]) == [0, 1, 1, 0]


def test_storage_sees_objects_other_processes_wrote(s3_service: S3Service) -> None:
    """A long-lived process (a warm worker) that listed a folder still reads what another
    process wrote there afterwards: no answer comes from a stale fsspec listing cache."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3_service.env.items():
            patch.setenv(key, value)
        storage = Storage(f"s3://{s3_service.bucket}/cache-{uuid.uuid4().hex[:6]}")
        folder = storage.path("images", "set", "flux_schnell")
        storage.write_bytes(folder / "a.png", b"a")
        assert storage.list_files(folder) == {"a.png": 1}
        other = s3fs.S3FileSystem(**s3_service.storage_options, skip_instance_cache=True)
        other.pipe_file(f"{folder.path}/b.png", b"bb")
        assert storage.list_files(folder) == {"a.png": 1, "b.png": 2}
        assert storage.exists(folder / "b.png")
        assert storage.read_bytes(folder / "b.png") == b"bb"
