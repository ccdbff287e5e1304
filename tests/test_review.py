"""Review that acts, in process: verdicts as data, thumbnails, reject-means-replace through the
``regenerate_images`` job and its sensor, export, and the review app's pages, traversal and
token rules (Starlette's test client). Two prompt sets generated once on the tiny FLUX model;
the tests run in order, each a stage of a review."""

from __future__ import annotations

import io
import json
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pandas as pd
import polars as pl
import pytest
from PIL import Image
from starlette.testclient import TestClient

from imagegen_pipeline.definitions import defs
from imagegen_pipeline.defs.jobs import prepare_prompts_job
from imagegen_pipeline.defs.partitions import (
    partition_key,
    prompt_set_partitions,
    prompt_set_x_backend_partitions,
)
from imagegen_pipeline.defs.review.jobs import regenerate_images_job
from imagegen_pipeline.defs.review.sensors import (
    regenerate_rejected_sensor,
    score_replacements_sensor,
)
from imagegen_pipeline.local_runner import range_tags
from imagegen_pipeline.review_app import SESSION_COOKIE, check_binding, create_app
from imagegen_pipeline.reviews import read_verdicts, record_verdict, verdict_history
from imagegen_pipeline.run_metadata import load_run_metadata
from imagegen_pipeline.steps.export import export_set
from imagegen_pipeline.steps.regenerate import replacement_seed
from imagegen_pipeline.storage import Storage
from imagegen_pipeline.thumbnails import ensure_thumbnail, thumbnail_path
from tests.conftest import EXAMPLE_CSV, resources_maker, temporary_instance

pytestmark = pytest.mark.slow
BACKEND = "flux_schnell"
HOSTILE_CSV = """prompt_id,prompt,num_images
evil,<script>alert('x')</script> a red fox,2
"""


class Generated:
    """Two prompt sets made with the tiny FLUX, their storage, instance and resources."""

    def __init__(self, root: Path, instance: dg.DagsterInstance, resources: dict[str, Any]):
        self.root = root
        self.instance = instance
        self.resources = resources
        self.storage = Storage(root / "storage")

    def images(self, prompt_set: str) -> pd.DataFrame:
        rows = load_run_metadata(self.storage, "images", prompt_set=prompt_set)
        return rows[rows["status"] == "ok"].sort_values(["prompt_id", "image_index"])

    def generate(self, prompt_sets: list[str]) -> None:
        """Prepare the sets, then images and quality only (clips and the comparison would
        cost the suite time and are not what these tests look at)."""
        first, last = prompt_sets[0], prompt_sets[-1]
        known = self.instance.get_dynamic_partitions(prompt_set_partitions.name)
        new = [name for name in prompt_sets if name not in known]
        self.instance.add_dynamic_partitions(prompt_set_partitions.name, new)
        scored = dg.define_asset_job(
            "images_and_quality",
            selection=dg.AssetSelection.assets("images", "quality"),
            partitions_def=prompt_set_x_backend_partitions,
        )
        jobs = dg.Definitions(
            assets=defs.assets, jobs=[prepare_prompts_job, scored], resources=self.resources
        )
        for job, (start, end) in (
            ("prepare_prompts", (first, last)),
            ("images_and_quality", (partition_key(first, BACKEND), partition_key(last, BACKEND))),
        ):
            result = jobs.resolve_job_def(job).execute_in_process(
                instance=self.instance, tags=range_tags(str(start), str(end))
            )
            assert result.success

    def regenerate(self, config: dict[str, Any]) -> dg.ExecuteInProcessResult:
        job = dg.Definitions(
            jobs=[regenerate_images_job], resources=self.resources
        ).resolve_job_def("regenerate_images")
        return job.execute_in_process(
            instance=self.instance, run_config={"ops": {"regenerate": {"config": config}}}
        )


@pytest.fixture(scope="module")
def generated(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_flux: Path,
    tiny_sdxl: Path,
    tiny_svd: Path,
    tiny_open_clip: Path,
) -> Iterator[Generated]:
    root = tmp_path_factory.mktemp("review")
    prompts = root / "prompts"
    prompts.mkdir()
    (prompts / "example.csv").write_text(EXAMPLE_CSV)
    (prompts / "hostile.csv").write_text(HOSTILE_CSV)
    make = resources_maker(root, prompts, tiny_flux, tiny_sdxl, tiny_svd, tiny_open_clip)
    resources = make()
    with temporary_instance(root / "dagster_home") as instance:
        generated = Generated(root, instance, resources)
        generated.generate(["example", "hostile"])
        yield generated


def test_verdicts_are_append_only_parquet_and_the_latest_wins(generated: Generated):
    storage = generated.storage
    images = generated.images("example")
    first, second = images["image_id"].iloc[0], images["image_id"].iloc[1]
    record_verdict(storage, "example", "flux_schnell", first, "keep", reviewer="ann")
    record_verdict(storage, "example", "flux_schnell", first, "reject", note="blurry")

    def review(name: str) -> None:  # two reviewers at once, 15 verdicts each
        for _ in range(15):
            record_verdict(storage, "example", "flux_schnell", second, "keep", reviewer=name)

    threads = [threading.Thread(target=review, args=(name,)) for name in ("bo", "cy")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    history = verdict_history(storage, "example", "flux_schnell")
    assert len(history) == 32  # nothing lost, nothing rewritten
    assert sorted(history.loc[history.image_id == second, "reviewer"].value_counts()) == [15, 15]
    latest = read_verdicts(storage, "example", "flux_schnell").set_index("image_id")
    assert list(latest.columns) == ["verdict", "note", "reviewer", "time"]
    assert latest.loc[first, "verdict"] == "reject" and latest.loc[first, "note"] == "blurry"
    assert latest.loc[second, "verdict"] == "keep"
    pattern = str(storage.path("reviews", "*", "*", "*.parquet"))
    assert duckdb.sql(f"select count(*) from read_parquet('{pattern}')").fetchall() == [(32,)]
    assert pl.read_parquet(pattern).height == 32
    with pytest.raises(ValueError, match="keep, reject"):
        record_verdict(storage, "example", "flux_schnell", first, "maybe")


def test_thumbnails_are_webp_made_once(generated: Generated):
    storage = generated.storage
    row = generated.images("example").iloc[0]
    data = ensure_thumbnail(storage, "example", "flux_schnell", row["image_id"], row["path"])
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "WEBP" and max(image.size) <= 256
    path = Path(thumbnail_path(storage, "example", "flux_schnell", row["image_id"]).path)
    made = path.stat().st_mtime_ns
    assert ensure_thumbnail(storage, "example", "flux_schnell", row["image_id"], "missing") == data
    assert path.stat().st_mtime_ns == made  # read, not made again (the source is not opened)


def test_the_sensor_asks_one_run_per_backend_for_new_rejects(generated: Generated, monkeypatch):
    monkeypatch.setenv("IMAGEGEN_STORAGE", str(generated.storage.base))
    # The verdicts were written a moment ago: while reviewers may still be at work, it waits.
    monkeypatch.setenv("IMAGEGEN_REVIEW_PAUSE_SECONDS", "3600")
    waiting = regenerate_rejected_sensor(dg.build_sensor_context(instance=generated.instance))
    assert not waiting.run_requests and "waiting for 3600 s" in str(waiting.skip_reason)
    assert waiting.cursor is None  # the verdicts stay to be handled
    monkeypatch.setenv("IMAGEGEN_REVIEW_PAUSE_SECONDS", "0")
    context = dg.build_sensor_context(instance=generated.instance)
    result = regenerate_rejected_sensor(context)
    (request,) = result.run_requests
    rejected = request.run_config["ops"]["regenerate"]["config"]["rejected"]
    first = generated.images("example")["image_id"].iloc[0]
    assert [r["image_id"] for r in rejected] == [first]  # the kept one is not asked for
    again = regenerate_rejected_sensor(
        dg.build_sensor_context(instance=generated.instance, cursor=result.cursor)
    )
    assert not again.run_requests  # nothing new since the cursor
    generated.cursor = result.cursor
    generated.request = request


def test_a_reject_is_replaced_with_a_new_seed_and_lineage(generated: Generated):
    config = generated.request.run_config["ops"]["regenerate"]["config"]
    before = generated.images("example")
    old = before.iloc[0]
    made = generated.regenerate(config)
    assert made.success
    after = generated.images("example")
    assert len(after) == len(before) + 1
    new = after[after["replaces"] == old["image_id"]].iloc[0]
    assert new["seed"] == replacement_seed(old["prompt_id"], int(old["image_index"]), 1)
    assert new["prompt_id"] == old["prompt_id"] and new["image_index"] == old["image_index"]
    assert Path(old["path"]).exists() and Path(new["path"]).exists()  # the old one stays
    # The run's replacements are scored, chosen among and animated by a generate run over
    # the partition the sensor asks for once the regenerate run has succeeded.
    (follow_up,) = replacements_follow_up(generated, made)
    assert follow_up.partition_key == partition_key("example", BACKEND)
    assert follow_up.tags["imagegen/reason"] == f"replaced:{made.run_id}"
    # Asking again makes nothing: the replacement is found by its content address, and
    # there is nothing to score again.
    again = generated.regenerate(config)
    assert again.success
    assert len(generated.images("example")) == len(after)
    assert "made no replacement" in str(replacements_follow_up(generated, again))
    # One slot, as `imagegen regenerate SET PROMPT_ID --index I` asks: the newest image of the
    # slot is replaced, with the slot's next seed.
    slot = {"prompt_set": "example", "prompt_id": old["prompt_id"], "index": 0}
    assert generated.regenerate({**slot, "backend": "flux_schnell"}).success
    newest = generated.images("example")
    third = newest[newest["replaces"] == new["image_id"]].iloc[0]
    assert third["seed"] == replacement_seed(old["prompt_id"], int(old["image_index"]), 2)
    exact = generated.regenerate({**slot, "seed": 7, "new_seed": False})
    assert exact.success
    assert 7 in set(generated.images("example")["seed"])


def replacements_follow_up(generated: Generated, run: dg.ExecuteInProcessResult) -> Any:
    """What ``score_replacements_sensor`` asks for once ``run`` has succeeded."""
    context = dg.build_run_status_sensor_context(
        sensor_name=score_replacements_sensor.name,
        dagster_event=run.get_run_success_event(),
        dagster_instance=generated.instance,
        dagster_run=generated.instance.get_run_by_id(run.run_id),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMAGEGEN_STORAGE", str(generated.storage.base))
        return score_replacements_sensor(context)


def test_the_next_generate_run_scores_the_replacements(generated: Generated):
    generated.generate(["example"])
    replacements = generated.images("example").dropna(subset=["replaces"])
    assert len(replacements) == 3
    scores = pd.read_parquet(
        generated.root / "storage" / "tables" / "quality" / "flux_schnell" / "example.parquet"
    ).set_index("image_id")
    assert scores.loc[list(replacements["image_id"]), "clip_score"].notna().all()
    steps = load_run_metadata(generated.storage, "steps", prompt_set="example")
    last = steps[steps.asset == "images"].sort_values("finished_at").iloc[-1]
    assert (last["generated"], last["skipped_existing"]) == (0, 7)  # found, none made again


def test_export_writes_chosen_images_and_a_manifest(generated: Generated, tmp_path: Path):
    storage = generated.storage
    count = export_set(storage, "example", tmp_path / "all")
    manifest = pd.read_csv(tmp_path / "all" / "manifest.csv")
    assert count == len(manifest) == 4  # four slots, each shown by its newest image
    assert {"prompt", "backend", "seed", "lora", "clip_score", "verdict", "path"} <= set(
        manifest.columns
    )
    assert all((tmp_path / "all" / path).is_file() for path in manifest["path"])
    assert manifest["clip_score"].notna().all()  # the replacements were scored too
    kept = export_set(storage, "example", tmp_path / "kept.zip", keepers_only=True)
    with zipfile.ZipFile(tmp_path / "kept.zip") as archive:
        names = archive.namelist()
        kept_manifest = pd.read_csv(archive.open("manifest.csv"))
    assert kept == 1 and set(kept_manifest["verdict"]) == {"keep"}
    assert kept_manifest["path"].iloc[0] in names


def test_the_app_lists_filters_and_escapes(generated: Generated):
    client = TestClient(create_app(generated.storage))
    home = client.get("/")
    assert home.status_code == 200 and "example" in home.text and "hostile" in home.text
    page = client.get("/sets/example")
    assert page.text.count('class="card') == 4 and "replacement" in page.text
    unreviewed = client.get("/sets/example", params={"unreviewed": "1"})
    assert unreviewed.text.count('class="card') == 3  # all but the kept one
    side = client.get("/sets/example", params={"view": "prompts"}).text
    assert [h for h in ("<h3>cat</h3>", "<h3>city</h3>", "<h3>owl</h3>") if h in side] == [
        "<h3>cat</h3>", "<h3>city</h3>", "<h3>owl</h3>"
    ]  # fmt: skip
    head = generated.images("example").sort_values("recorded_at").iloc[-1]
    detail = client.get(f"/sets/example/images/flux_schnell/{head['image_id']}").text
    assert detail.count('class="card') >= 2 and "reject" in detail  # its history, verdicts
    assert f"seed {head['seed']}" in detail
    hostile = client.get("/sets/hostile").text
    assert "<script>alert" not in hostile and "&lt;script&gt;alert(" in hostile
    image = generated.images("hostile").iloc[0]
    thumb = client.get(f"/thumbs/hostile/flux_schnell/{image['image_id']}.webp")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"
    saved = client.post(
        "/api/verdicts",
        json={"prompt_set": "hostile", "backend": "flux_schnell", "image_id": image["image_id"],
              "verdict": "reject"},
    )  # fmt: skip
    assert saved.status_code == 200 and saved.json()["saved"].startswith("reviews/hostile/")
    # The answer carries the set's counts as they now stand: the page's header shows them.
    summary = saved.json()["summary"]
    assert (summary["reviewed"], summary["rejected"], summary["kept"]) == (1, 1, 0)
    assert read_verdicts(generated.storage, "hostile", "flux_schnell")["verdict"].tolist() == [
        "reject"
    ]
    form = client.post("/api/verdicts", data={"verdict": "keep"})  # a cross-site form
    assert form.status_code == 415


def test_served_files_stay_inside_the_storage(generated: Generated, tmp_path: Path):
    storage = generated.storage
    client = TestClient(create_app(storage))
    image = generated.images("example").iloc[0]
    relative = Path(image["path"]).relative_to(storage.base.path).as_posix()
    assert client.get(f"/files/{relative}").status_code == 200
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG secret")
    (Path(storage.base.path) / "images" / "link.png").symlink_to(secret)
    for attempt in (
        "/files/../README.md",
        "/files/images/../../secret.png",
        "/files/images/%2e%2e/%2e%2e/secret.png",
        "/files/images%2f..%2f..%2fsecret.png",
        f"/files/{secret}",
        f"/files//{secret}",
        "/files/images/link.png",
        "/files/reviews/example",
        "/files/run_metadata/images/example/flux_schnell",
        "/sets/..%2f..%2fetc",
        "/thumbs/example/flux_schnell/..%2f..%2fsecret.webp",
    ):
        answer = client.get(attempt)
        assert answer.status_code == 404, attempt
        assert b"secret" not in answer.content


def test_a_token_guards_every_request(generated: Generated):
    with pytest.raises(SystemExit, match="IMAGEGEN_REVIEW_TOKEN"):
        check_binding("0.0.0.0", None)
    check_binding("0.0.0.0", "s3cret-token")
    check_binding("127.0.0.1", None)
    client = TestClient(create_app(generated.storage, token="s3cret-token"))
    assert client.get("/").status_code == 401
    assert client.get("/sets/example").status_code == 401
    assert client.post("/api/verdicts", json={}).status_code == 401
    assert client.get("/", params={"token": "wrong"}).status_code == 403
    login = client.get("/sets/example", params={"token": "s3cret-token"}, follow_redirects=False)
    assert login.status_code == 303 and "s3cret" not in login.headers["location"]
    assert "s3cret" not in login.headers["set-cookie"]  # the cookie holds a derived value
    assert client.get("/sets/example").status_code == 200  # the cookie, from now on
    fresh = TestClient(create_app(generated.storage, token="s3cret-token"))
    assert fresh.get("/", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    fresh.cookies.set(SESSION_COOKIE, "forged")
    assert fresh.get("/").status_code == 401


def test_verdicts_order_the_static_gallery(generated: Generated):
    from imagegen_pipeline.defs.comparison.assets import with_latest_verdicts
    from imagegen_pipeline.steps.comparison import backend_summary, gallery_html
    from imagegen_pipeline.steps.review import quality_table

    storage = generated.storage
    table = quality_table(storage, "hostile", "flux_schnell")
    first, second = sorted(
        table["image_id"], key=lambda i: int(table.set_index("image_id").loc[i, "image_index"])
    )
    # hostile's first image was rejected in the app (above); keep the second.
    record_verdict(storage, "hostile", "flux_schnell", second, "keep")
    reports = {"flux_schnell": with_latest_verdicts(table, storage, "hostile", "flux_schnell")}
    page = gallery_html(
        "hostile", backend_summary(reports, {}), reports, {}, b"", read_bytes=storage.read_bytes
    )
    paths = table.set_index("image_id")["path"]
    assert page.index(str(paths[second])) < page.index(str(paths[first]))  # keep before reject


def test_the_cli_regenerates_one_slot_and_exports(
    generated: Generated, tiny_flux: Path, tmp_path: Path, monkeypatch, capsys
):
    from imagegen_pipeline.cli import main

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("IMAGEGEN_STORAGE", str(generated.storage.base))
    monkeypatch.setenv("IMAGEGEN_FLUX_SCHNELL_MODEL", str(tiny_flux))
    before = generated.images("hostile")
    argv = ["regenerate", "hostile", "evil", "--index", "1", "--backend", BACKEND, "--seed", "5"]
    assert main(argv) == 0
    after = generated.images("hostile")
    new = after[~after["image_id"].isin(before["image_id"])]
    assert list(new["seed"]) == [5] and list(new["image_index"]) == [1]
    old = before[before["image_index"] == 1]["image_id"].iloc[0]
    assert list(new["replaces"]) == [old]
    assert main(["regenerate", "hostile", "nobody", "--backend", BACKEND]) == 1
    assert "no image nobody[0]" in capsys.readouterr().out
    assert main(["export", "hostile", str(tmp_path / "out.zip")]) == 0
    with zipfile.ZipFile(tmp_path / "out.zip") as archive:
        manifest = pd.read_csv(archive.open("manifest.csv"))
    # The rejected first image is left out; the second slot shows its replacement.
    assert list(manifest["image_id"]) == list(new["image_id"])


def test_a_steered_image_shows_its_control():
    from imagegen_pipeline.steps.review import control_label

    canny = {"image": "/p/layout.png", "sha256": "a", "type": "canny", "scale": 0.5}
    assert control_label(json.dumps(canny | {"used_as": "controlnet"})) == "canny:0.5 layout.png"
    assert control_label(json.dumps(canny | {"used_as": "reference"})) == "reference layout.png"
    assert control_label("") == "" and control_label(None) == ""


def test_a_card_names_each_lora_as_people_do():
    from imagegen_pipeline.steps.review import lora_names

    folder = {"source": "/p/styles/brand/pytorch_lora_weights.safetensors", "scale": 0.8}
    named = {"source": "/p/detail.safetensors", "scale": 0.4}
    hub = {"source": "user/ink-lora", "scale": 1.0}  # resolved from the hub cache
    assert (
        lora_names(json.dumps([folder, named, hub]))
        == "brand:0.8, detail.safetensors:0.4, ink-lora:1"
    )
    assert lora_names("") == "" and lora_names(None) == ""


def test_the_keepers_asset_orders_the_grid_and_picks_the_export(
    generated: Generated, tmp_path: Path
):
    """With a keepers table (the best-of-N asset), a set's grid shows each prompt's keepers
    first and --keepers-only exports them with the reviewers' keeps."""
    from imagegen_pipeline.reviews import VerdictCache
    from imagegen_pipeline.steps.review import ReviewFilter, filtered, set_images

    storage = generated.storage
    rows = set_images(storage, "example", VerdictCache(storage))
    heads = rows[rows["is_head"] & (rows["backend"] == "flux_schnell")]
    cat = heads[heads["prompt_id"] == heads["prompt_id"].iloc[0]].sort_values("image_index")
    assert len(cat) >= 2
    last = cat.iloc[-1]["image_id"]  # the scorer's keeper: the prompt's last image
    table = cat.assign(kept=cat["image_id"] == last, rank=[2] * (len(cat) - 1) + [1])
    table = table.assign(scorer="clip", score=1.0, below_gate=False)
    path = tmp_path / "keepers.parquet"
    table[["image_id", "prompt_id", "kept", "rank", "scorer", "score", "below_gate"]].to_parquet(
        path
    )
    storage.write_bytes(
        storage.path("tables", "keepers", "flux_schnell", "example.parquet"), path.read_bytes()
    )
    rows = set_images(storage, "example", VerdictCache(storage))
    grid = filtered(rows, ReviewFilter(backend="flux_schnell"), gate=20.0)
    same_prompt = grid[grid["prompt_id"] == cat.iloc[0]["prompt_id"]]
    assert same_prompt.iloc[0]["image_id"] == last  # the keeper leads its prompt
    count = export_set(storage, "example", tmp_path / "keepers", keepers_only=True)
    manifest = pd.read_csv(tmp_path / "keepers" / "manifest.csv")
    assert last in set(manifest["image_id"]) and count == len(manifest)
    assert set(manifest["verdict"].fillna("") + "|" + manifest["kept"].astype(str)) <= {
        "keep|True",
        "keep|False",
        "keep|nan",
        "|True",
    }
