"""The gemini partition of ``images``, materialized by Dagster against local fakes of the API."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest
from PIL import Image

from imagegen_pipeline.backends.gemini.settings import GeminiSettings
from imagegen_pipeline.defs.images.assets import images
from imagegen_pipeline.defs.images.checks import images_checks
from imagegen_pipeline.defs.model_resources import settings_resource
from imagegen_pipeline.defs.prompts.assets import enhanced_prompts, prompts
from imagegen_pipeline.defs.prompts.resources import PromptEnhancerResource
from imagegen_pipeline.defs.resources import default_resources
from imagegen_pipeline.defs.storage import StepOutputIOManager, StorageResource, TableIOManager
from imagegen_pipeline.run_metadata import load_run_metadata
from tests.support.fake_servers import FAKE_GEMINI_KEY, FakeGemini

GeminiResource = settings_resource(GeminiSettings)

PROMPT_SET = "mixed"
PROMPTS_CSV = """prompt_id,prompt,style,seed,num_images,backends
fox,a red fox asleep in the snow,photorealistic,11,2,gemini
harbour,a fishing harbour at dawn,cinematic,,1,gemini
volcano,a volcano erupting at night,artistic,,1,gemini
garden,a zen garden with raked gravel,anime,,1,gemini
canyon,an echo in a red canyon,none,,1,gemini
owl,a brass clockwork owl on a book,artistic,,1,flux_schnell
"""
GEMINI_PARTITION = dg.MultiPartitionKey({"prompt_set": PROMPT_SET, "backend": "gemini"})


def home(tmp_path: Path) -> str:
    """A fresh DAGSTER_HOME folder for one test's instance."""
    folder = tmp_path / "dagster_home"
    folder.mkdir(exist_ok=True)
    return str(folder)


@pytest.fixture
def prompts_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / f"{PROMPT_SET}.csv").write_text(PROMPTS_CSV)
    return folder


@pytest.fixture
def text_gemini() -> Iterator[FakeGemini]:
    """A second fake for the text enhancer, so its calls never consume the image scripts."""
    with FakeGemini(api_key=FAKE_GEMINI_KEY) as server:
        yield server


def make_resources(
    tmp_path: Path, prompts_folder: Path, image_server: FakeGemini, text_server: FakeGemini
) -> dict[str, Any]:
    """The project's resources on temporary folders, with Gemini pointed at the fakes."""
    storage = StorageResource(prompts_dir=str(prompts_folder), base=str(tmp_path / "storage"))
    # No key anywhere in the resources: it is read from GEMINI_API_KEY when the step starts.
    return {
        **default_resources(),  # the local backends' resources: never loaded here
        "storage": storage,
        "io_manager": TableIOManager(storage=storage),
        "step_io_manager": StepOutputIOManager(storage=storage),
        "enhancer": PromptEnhancerResource(
            method_by_prompt_set={PROMPT_SET: "gemini"},
            gemini_base_url=text_server.url,
            initial_backoff_seconds=0.01,
            max_backoff_seconds=0.05,
        ),
        "gemini": GeminiResource(
            base_url=image_server.url,
            timeout_seconds=2.0,
            requests_per_minute=6000,
            max_concurrent_requests=3,
            initial_backoff_seconds=0.01,
            max_backoff_seconds=0.05,
        ),
    }


def materialize_gemini_partition(
    instance: dg.DagsterInstance, resources: dict[str, Any]
) -> tuple[dg.ExecuteInProcessResult, dg.ExecuteInProcessResult]:
    """prompts and enhanced_prompts for the set, then images for its gemini partition."""
    instance.add_dynamic_partitions("prompt_sets", [PROMPT_SET])
    prepared = dg.materialize(
        [prompts, enhanced_prompts],
        partition_key=PROMPT_SET,
        resources=resources,
        instance=instance,
    )
    assert prepared.success
    generated = dg.materialize(
        [prompts, enhanced_prompts, images],
        selection=[images],
        partition_key=GEMINI_PARTITION,
        resources=resources,
        instance=instance,
        raise_on_error=False,
    )
    return prepared, generated


def images_output(
    instance: dg.DagsterInstance, result: dg.ExecuteInProcessResult
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The gemini partition's images table and its materialization metadata."""
    tables = result.output_for_node("images")
    [record] = instance.fetch_materializations(dg.AssetKey("images"), limit=1).records
    metadata = {key: value.value for key, value in record.asset_materialization.metadata.items()}
    return tables[str(GEMINI_PARTITION)] if isinstance(tables, dict) else tables, metadata


def script_faults(server: FakeGemini) -> None:
    server.script("harbour", "rate_limit", "ok")
    server.script("volcano", "image_safety")
    server.script("garden", "server_error", "unavailable", "ok")
    server.script("canyon", "bad_key")  # the server echoes the key back in its error


def test_the_gemini_partition_with_a_mix_of_faults(
    tmp_path: Path,
    prompts_folder: Path,
    fake_gemini: FakeGemini,
    text_gemini: FakeGemini,
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setenv("GEMINI_API_KEY", FAKE_GEMINI_KEY)
    script_faults(fake_gemini)
    resources = make_resources(tmp_path, prompts_folder, fake_gemini, text_gemini)

    with dg.instance_for_test(temp_dir=home(tmp_path)) as instance:
        _, result = materialize_gemini_partition(instance, resources)

        assert result.success
        table, metadata = images_output(instance, result)

    enhanced = pd.read_parquet(tmp_path / "storage/tables/enhanced_prompts/mixed.parquet")
    assert set(enhanced["method"]) == {"gemini"} and set(enhanced["model"]) == {"gemini-2.5-flash"}
    rows = {(row["prompt_id"], row["image_index"]): row for row in table.to_dict("records")}
    assert sorted(rows) == [
        ("canyon", 0),
        ("fox", 0),
        ("fox", 1),
        ("garden", 0),
        ("harbour", 0),
        ("volcano", 0),
    ]  # the flux-only prompt is not planned for gemini
    status = {key: row["status"] for key, row in rows.items()}
    assert status == {
        ("canyon", 0): "failed",
        ("fox", 0): "ok",
        ("fox", 1): "ok",
        ("garden", 0): "ok",
        ("harbour", 0): "ok",
        ("volcano", 0): "blocked",
    }
    assert rows[("harbour", 0)]["retries"] == 1 and rows[("garden", 0)]["retries"] == 2
    assert rows[("volcano", 0)]["finish_reason"] == "IMAGE_SAFETY"
    assert pd.isna(rows[("volcano", 0)]["path"])  # no placeholder image
    assert "API key not valid" in rows[("canyon", 0)]["error"]
    for key in [("fox", 0), ("fox", 1), ("garden", 0), ("harbour", 0)]:
        row = rows[key]
        assert row["output_tokens"] == 1290 and 0.0386 < row["cost_usd"] < 0.039
        assert row["negative_prompt"] == ""  # Gemini has no negative prompt: none recorded
        with Image.open(row["path"]) as png:
            assert png.text["prompt"] == row["prompt"] and png.text["seed"] == str(row["seed"])
    # The seeds and sizes asked for are what was sent: the CSV's seed, then the next one.
    sent = [
        (r.prompt, r.generation_config["seed"], r.generation_config["imageConfig"])
        for r in fake_gemini.requests
    ]
    for index, seed in ((0, 11), (1, 12)):
        fox = rows[("fox", index)]
        assert fox["seed"] == seed
        assert (fox["prompt"], seed, {"aspectRatio": "1:1"}) in sent

    assert metadata["ok"] == 4 and metadata["blocked"] == 1 and metadata["failed"] == 1
    assert metadata["skipped_budget"] == 0 and metadata["retries"] == 3
    assert metadata["output_tokens"] == 4 * 1290 + 0
    assert metadata["prompt_tokens"] == int(table["prompt_tokens"].fillna(0).sum()) > 0
    assert metadata["cost_usd"] == pytest.approx(table["cost_usd"].fillna(0).sum())
    assert metadata["http_calls"] == 9  # 6 images, 3 retries
    metadata_rows = load_run_metadata(tmp_path / "storage", "images")
    assert list(metadata_rows["status"]).count("ok") == 4
    # A hosted API's partition held no slot of the gpu pool while it waited on the network:
    # its images were made by the op outside the pool.
    steps = load_run_metadata(tmp_path / "storage", "steps")
    assert list(steps["asset"]) == ["images"] and steps["model_loads"].sum() == 0


def test_the_budget_cap_in_the_asset(
    tmp_path: Path,
    prompts_folder: Path,
    fake_gemini: FakeGemini,
    text_gemini: FakeGemini,
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setenv("GEMINI_API_KEY", FAKE_GEMINI_KEY)
    resources = make_resources(tmp_path, prompts_folder, fake_gemini, text_gemini)
    resources["gemini"] = GeminiResource(
        base_url=fake_gemini.url,
        max_concurrent_requests=1,
        budget_usd=0.08,  # two images at the expected $0.039 each
    )

    with dg.instance_for_test(temp_dir=home(tmp_path)) as instance:
        _, result = materialize_gemini_partition(instance, resources)
        logs = [entry.user_message for entry in instance.all_logs(result.run_id)]
        table, metadata = images_output(instance, result)

    assert result.success
    assert sorted(table["status"]) == ["ok", "ok"] + ["skipped_budget"] * 4
    assert metadata["skipped_budget"] == 4
    assert metadata["budget_reached"] is True
    assert any("Gemini budget of $0.08 reached" in message for message in logs)
    assert len(fake_gemini.requests) == 2


def test_the_api_key_appears_nowhere(
    tmp_path: Path,
    prompts_folder: Path,
    fake_gemini: FakeGemini,
    text_gemini: FakeGemini,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
):
    monkeypatch.setenv("GEMINI_API_KEY", FAKE_GEMINI_KEY)
    script_faults(fake_gemini)
    text_gemini.script("volcano", "bad_key")  # the text enhancer's error echoes the key too
    resources = make_resources(tmp_path, prompts_folder, fake_gemini, text_gemini)
    caplog.set_level(logging.DEBUG)
    dagster_home = Path(home(tmp_path))

    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        prepared, generated = materialize_gemini_partition(instance, resources)
        assert generated.success
        texts: list[str] = []
        for result in (prepared, generated):
            for entry in instance.all_logs(result.run_id):
                texts += [entry.message, entry.user_message, dg.serialize_value(entry)]
            texts.append(repr(instance.get_run_by_id(result.run_id)))
            for event in result.all_events:
                texts.append(repr(event))
        for record in instance.fetch_materializations(dg.AssetKey("images"), limit=10).records:
            texts += [repr(value) for value in record.asset_materialization.metadata.values()]
    texts += [record.getMessage() for record in caplog.records]

    # The key was really used (sent by the SDK, echoed back by the server) ...
    assert all(r.headers["x-goog-api-key"] == FAKE_GEMINI_KEY for r in fake_gemini.requests)
    assert all(r.headers["x-goog-api-key"] == FAKE_GEMINI_KEY for r in text_gemini.requests)
    assert any("[redacted]" in text for text in texts)
    # ... and is in no log line, event, metadata value or run record,
    assert not [text for text in texts if FAKE_GEMINI_KEY in text]
    storage = tmp_path / "storage"
    parquet_files = sorted(storage.rglob("*.parquet"))
    png_files = sorted(storage.rglob("*.png"))
    assert parquet_files and len(png_files) == 4
    # in no Parquet table (cells and raw bytes),
    for path in parquet_files:
        assert FAKE_GEMINI_KEY not in pd.read_parquet(path).astype(str).to_csv()
    # in no PNG text chunk,
    for path in png_files:
        with Image.open(path) as png:
            assert not [value for value in png.text.values() if FAKE_GEMINI_KEY in value]
    # and in no file at all: storage, enhancement cache, Dagster's database and compute logs.
    key_bytes = FAKE_GEMINI_KEY.encode()
    every_file = [
        path for path in [*storage.rglob("*"), *dagster_home.rglob("*")] if path.is_file()
    ]
    assert len(every_file) > len(parquet_files) + len(png_files)
    assert not [path for path in every_file if key_bytes in path.read_bytes()]


def test_without_a_key_the_gemini_partition_fails_fast(
    tmp_path: Path, prompts_folder: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.setenv("IMAGEGEN_PROMPTS_DIR", str(prompts_folder))
    monkeypatch.setenv("IMAGEGEN_STORAGE", str(tmp_path / "storage"))
    resources = default_resources()  # the real wiring: no key in the environment

    with dg.instance_for_test(temp_dir=home(tmp_path)) as instance:
        instance.add_dynamic_partitions("prompt_sets", [PROMPT_SET])
        prepared = dg.materialize(
            [prompts, enhanced_prompts],
            partition_key=PROMPT_SET,
            resources=resources,
            instance=instance,
        )
        assert prepared.success  # the template enhancer needs no key
        result = dg.materialize(
            [prompts, enhanced_prompts, images],
            selection=[images],
            partition_key=GEMINI_PARTITION,
            resources=resources,
            instance=instance,
            raise_on_error=False,
        )

    assert not result.success
    [failure] = [event for event in result.all_events if event.is_step_failure]
    message = failure.step_failure_data.error.message
    assert "GEMINI_API_KEY is not set: export GEMINI_API_KEY=..." in message
    assert "https://aistudio.google.com/apikey" in message
    assert not (tmp_path / "storage" / "images").exists()  # failed before any work


def test_default_resources_never_hold_the_key(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GEMINI_API_KEY", FAKE_GEMINI_KEY)

    resources = default_resources()

    # Read from the environment when a step starts: a run config that sets another field of
    # the resource cannot drop it, and no run record ever stores it.
    assert resources["gemini"].api_key is None and resources["enhancer"].gemini_api_key is None
    assert FAKE_GEMINI_KEY not in repr(resources)


def test_a_launchpad_run_config_with_one_field_keeps_the_model_and_the_key(
    tmp_path: Path,
    prompts_folder: Path,
    fake_gemini: FakeGemini,
    tiny_flux: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    """What a user does in the launchpad: set one field of a resource. Dagster replaces the
    resource's Python-set values with its class defaults when a run config configures it; the
    project's resources hold none, so the model and the key still come from the environment."""
    monkeypatch.setenv("GEMINI_API_KEY", FAKE_GEMINI_KEY)
    monkeypatch.setenv("IMAGEGEN_FLUX_SCHNELL_MODEL", str(tiny_flux))
    monkeypatch.setenv("IMAGEGEN_PROMPTS_DIR", str(prompts_folder))
    monkeypatch.setenv("IMAGEGEN_STORAGE", str(tmp_path / "storage"))
    from imagegen_pipeline.definitions import defs  # the project's real resources

    run_config = {
        "resources": {
            "flux_schnell": {"config": {"width": 64, "height": 64, "batch_size": 2}},
            "gemini": {"config": {"base_url": fake_gemini.url, "requests_per_minute": 6000}},
        }
    }
    with dg.instance_for_test(temp_dir=home(tmp_path)) as instance:
        instance.add_dynamic_partitions("prompt_sets", [PROMPT_SET])
        prepared = defs.resolve_job_def("prepare_prompts").execute_in_process(
            partition_key=PROMPT_SET, instance=instance
        )
        assert prepared.success
        for backend in ("flux_schnell", "gemini"):
            result = defs.resolve_job_def("generate_images").execute_in_process(
                partition_key=dg.MultiPartitionKey({"prompt_set": PROMPT_SET, "backend": backend}),
                asset_selection=[dg.AssetKey("images")],
                run_config=run_config,
                instance=instance,
            )
            assert result.success, backend
        stored = [repr(r.dagster_run.run_config) for r in instance.get_run_records()]

    made = load_run_metadata(tmp_path / "storage", "images")
    assert set(made["status"]) == {"ok"}
    assert set(made["backend"]) == {"flux_schnell", "gemini"}
    flux = made[made.backend == "flux_schnell"]
    # The environment's tiny model, at the run config's size, with the other fields' defaults.
    assert set(flux["model_id"]) == {str(tiny_flux)} and set(flux["width"]) == {64}
    assert set(flux["steps"]) == {4}
    assert all(r.headers["x-goog-api-key"] == FAKE_GEMINI_KEY for r in fake_gemini.requests)
    assert not [text for text in stored if FAKE_GEMINI_KEY in text]


def test_a_daily_quota_stops_sending_and_the_step_ends_with_a_warn_check(
    tmp_path: Path,
    prompts_folder: Path,
    fake_gemini: FakeGemini,
    text_gemini: FakeGemini,
    monkeypatch: pytest.MonkeyPatch,
):
    """What README "Gemini" says: the step stops sending, finishes, and warns."""
    monkeypatch.setenv("GEMINI_API_KEY", FAKE_GEMINI_KEY)
    fake_gemini.script("volcano", "daily_quota")
    resources = make_resources(tmp_path, prompts_folder, fake_gemini, text_gemini)
    resources["gemini"] = GeminiResource(base_url=fake_gemini.url, max_concurrent_requests=1)

    with dg.instance_for_test(temp_dir=home(tmp_path)) as instance:
        instance.add_dynamic_partitions("prompt_sets", [PROMPT_SET])
        assert dg.materialize(
            [prompts, enhanced_prompts],
            partition_key=PROMPT_SET,
            resources=resources,
            instance=instance,
        ).success
        result = dg.materialize(
            [prompts, enhanced_prompts, images, images_checks],
            selection=dg.AssetSelection.assets(images),
            partition_key=GEMINI_PARTITION,
            resources=resources,
            instance=instance,
            raise_on_error=False,
        )
        logs = [entry.user_message for entry in instance.all_logs(result.run_id)]
        table, metadata = images_output(instance, result)

    assert result.success  # the step ends normally
    status = dict(
        zip(
            table["prompt_id"] + "/" + table["image_index"].astype(str),
            table["status"],
            strict=True,
        )
    )
    assert status == {
        "fox/0": "ok",
        "fox/1": "ok",
        "harbour/0": "ok",
        "volcano/0": "failed",
        "garden/0": "failed",
        "canyon/0": "failed",
    }
    errors = table.set_index("prompt_id")["error"]
    assert errors["volcano"].startswith("daily quota exhausted")
    assert errors["garden"].startswith("not sent") and errors["canyon"].startswith("not sent")
    assert len(fake_gemini.requests) == 4  # nothing sent after the quota answer
    assert metadata["daily_quota_exhausted"] is True
    assert any("daily quota is exhausted" in message for message in logs)
    (check,) = [
        check
        for check in result.get_asset_check_evaluations()
        if check.check_name == "every_image_generated"
    ]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
