"""ControlNet: control images from the CSV (or a set's sidecar), their maps, tiny ControlNets in
the real repos' layout steering the tiny models, and the content address."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from imagegen_pipeline.backends.base import ImageRequest
from imagegen_pipeline.backends.flux_schnell import FluxSchnellBackend, FluxSchnellSettings
from imagegen_pipeline.backends.sdxl_turbo import SdxlTurboBackend, SdxlTurboSettings
from imagegen_pipeline.control import ControlInput, canny_edges, control_map, control_of
from imagegen_pipeline.prompt_csv import read_prompt_csv


def square(path: Path, box: tuple[int, int, int, int] = (16, 16, 48, 48)) -> Path:
    image = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(image).rectangle(box, fill="white")
    image.save(path)
    return path


def test_canny_finds_the_outline_of_a_square_and_nothing_else(tmp_path: Path) -> None:
    gray = np.zeros((64, 64), dtype=np.float32)
    gray[16:48, 16:48] = 255.0
    edges = canny_edges(gray, 100.0, 200.0)
    assert set(np.unique(edges)) == {0, 255}
    assert edges[30:34, 14:19].any() and edges[14:19, 30:34].any()  # left and top sides
    assert not edges[22:42, 22:42].any()  # nothing inside
    assert not edges[:8].any() and not edges[:, 56:].any()  # nothing far outside
    # Thin: a straight side is at most two pixels wide.
    assert edges[32, :32].astype(bool).sum() <= 2


def test_maps_are_made_at_the_image_size(tmp_path: Path) -> None:
    image = square(tmp_path / "layout.png")
    canny = control_of(str(image), "canny", 1.0)
    depth = control_of(str(image), "depth", 1.0)
    assert canny is not None and depth is not None
    edge_map = control_map(canny, 128, 96)
    assert edge_map.size == (128, 96) and edge_map.mode == "RGB"
    as_given = np.asarray(control_map(depth, 64, 64))
    np.testing.assert_array_equal(as_given, np.asarray(Image.open(image).convert("RGB")))
    assert np.asarray(edge_map).mean() < as_given.mean()  # edges only, not the filled square


def request(index: int, control: ControlInput | None = None) -> ImageRequest:
    return ImageRequest("p", index, "a house on a hill", "", 7, 64, 64, control=control)


def pixels(result) -> np.ndarray:
    assert result.status == "ok", result.error
    return np.asarray(result.image, dtype=np.float32)


def test_a_controlnet_steers_sdxl_and_loads_once_per_type(tiny_sdxl: Path, tmp_path: Path) -> None:
    first = square(tmp_path / "a.png")
    second = square(tmp_path / "b.png", (4, 30, 60, 40))
    settings = SdxlTurboSettings(model=str(tiny_sdxl), device="cpu", width=64, height=64)
    backend = SdxlTurboBackend(settings.model_copy(update={"batch_size": 2}))
    requests = [
        request(0),
        request(1, control_of(str(first), "canny", 1.0)),
        request(2, control_of(str(second), "canny", 1.0)),
        request(3, control_of(str(first), "canny", 0.0)),
        request(4),
    ]
    results = {r.request.image_index: r for r in backend.generate(requests)}
    base = pixels(results[0])
    np.testing.assert_array_equal(pixels(results[4]), base)  # the base pipeline is untouched
    assert np.abs(pixels(results[1]) - base).mean() > 1.0  # a control image changes the image
    assert np.abs(pixels(results[2]) - pixels(results[1])).mean() > 1.0  # two layouts, two images
    np.testing.assert_allclose(pixels(results[3]), base, atol=1.0)  # scale 0: the base image
    assert results[0].details["control_map"] is None
    assert results[1].details["control_map"].size == (64, 64)
    summary = backend.run_summary().metadata
    assert summary["controlnet_loads"] == 1 and backend.model_loads == 1  # two scales, one load
    # The tiny ControlNet sits beside the tiny model in diffusers/controlnet-canny-sdxl-1.0's
    # layout: a config and fp16 + fp32 safetensors.
    built = tiny_sdxl.parent / f"{tiny_sdxl.name}-controlnet-canny"
    assert json.loads((built / "config.json").read_text())["_class_name"] == "ControlNetModel"
    assert (built / "diffusion_pytorch_model.fp16.safetensors").is_file()


def test_a_controlnet_steers_flux(tiny_flux: Path, tmp_path: Path) -> None:
    layout = square(tmp_path / "layout.png")
    settings = FluxSchnellSettings(model=str(tiny_flux), device="cpu", width=64, height=64)
    backend = FluxSchnellBackend(settings.model_copy(update={"batch_size": 1}))
    results = {
        r.request.image_index: pixels(r)
        for r in backend.generate([request(0), request(1, control_of(str(layout), "depth", 1.0))])
    }
    assert np.abs(results[1] - results[0]).mean() > 1.0


def test_a_type_without_a_controlnet_fails_its_images_clearly(tiny_flux: Path, tmp_path: Path):
    """FLUX has no pose ControlNet by default: its rows fail naming the setting to add."""
    from imagegen_pipeline.backends.controlnets import ControlNets

    nets = ControlNets(None, "flux_schnell", "", "", {"canny": "x/y"}, None, "cpu", "none", False)
    assert nets.source("none") == "x/y"  # a ready-made map uses the canny ControlNet
    with pytest.raises(ValueError, match=r"models\.flux_schnell\.controlnets\.pose"):
        nets.source("pose")


def test_the_csv_columns_are_checked_per_row_and_drive_the_content_address(tmp_path: Path):
    from imagegen_pipeline.enhancement import enhance_prompts
    from imagegen_pipeline.enhancement.template import TemplateEnhancer
    from imagegen_pipeline.registry import MODELS
    from imagegen_pipeline.steps.images import plan_images

    (tmp_path / "maps").mkdir()
    square(tmp_path / "maps" / "layout.png")
    (tmp_path / "maps" / "broken.png").write_bytes(b"not an image")
    csv = tmp_path / "set.csv"
    csv.write_text(
        "prompt_id,prompt,control_image,control_type,control_scale\n"
        "plain,a cat,,,\n"
        "steered,a cat,maps/layout.png,,0.5\n"
        "depth,a cat,maps/layout.png,depth,\n"
        "missing,a dog,maps/nowhere.png,,\n"
        "broken,a dog,maps/broken.png,,\n"
        "kind,a dog,maps/layout.png,normal,\n"
        "strong,a dog,maps/layout.png,,3\n"
        "lonely,a dog,,pose,\n"
    )
    table = read_prompt_csv(csv)
    rows = table.valid.set_index("prompt_id")
    assert list(rows.index) == ["plain", "steered", "depth"]
    assert rows.loc["steered", "control_type"] == "canny"  # the default type with an image
    assert rows.loc["steered", "control_image"] == str((tmp_path / "maps/layout.png").resolve())
    reasons = {r["line"]: (r["field"], r["reason"]) for r in table.rejected.to_dict("records")}
    assert reasons[5][0] == "control_image" and "nowhere.png" in reasons[5][1]
    assert reasons[6][0] == "control_image" and "not a readable image" in reasons[6][1]
    assert reasons[7] == (
        "control_type",
        "unknown control_type 'normal'; use one of canny, depth, pose, none",
    )
    assert reasons[8][0] == "control_scale" and "between 0 and 2.0" in reasons[8][1]
    assert reasons[9] == ("control_type", "control_type needs a control_image")

    target = MODELS["sdxl_turbo"].settings(width=64, height=64).image_target("sdxl_turbo", "m")

    def plan() -> dict[str, str]:
        enhanced = enhance_prompts(read_prompt_csv(csv).valid, TemplateEnhancer())
        return {item.request.prompt_id: item.image_id for item in plan_images(enhanced, target)}

    before = plan()
    assert plan() == before
    assert len(set(before.values())) == 3  # no control, canny at 0.5, depth: three addresses
    square(tmp_path / "maps" / "layout.png", (0, 0, 20, 20))  # the layout is redrawn
    after = plan()
    assert after["plain"] == before["plain"]
    assert after["steered"] != before["steered"] and after["depth"] != before["depth"]


def test_a_sidecar_gives_the_set_its_control_type(tmp_path: Path) -> None:
    square(tmp_path / "layout.png")
    csv = tmp_path / "set.csv"
    csv.write_text("prompt_id,prompt,control_image\na,a cat,layout.png\nb,a dog,\n")
    (tmp_path / "set.toml").write_text('control_type = "depth"\ncontrol_scale = 0.7\n')
    rows = read_prompt_csv(csv).valid.set_index("prompt_id")
    assert rows.loc["a", "control_type"] == "depth" and rows.loc["a", "control_scale"] == 0.7
    assert rows.loc["b", "control_type"] == ""  # no image: no control


def test_the_step_saves_the_map_beside_the_image_and_records_the_control(
    tiny_sdxl: Path, tmp_path: Path
) -> None:
    from imagegen_pipeline.enhancement import enhance_prompts
    from imagegen_pipeline.enhancement.template import TemplateEnhancer
    from imagegen_pipeline.steps.images import (
        ImagesStepContext,
        control_map_name,
        plan_images,
        run_images_step,
    )
    from imagegen_pipeline.storage import Storage

    square(tmp_path / "layout.png")
    csv = tmp_path / "set.csv"
    csv.write_text("prompt_id,prompt,control_image\na,a cat,layout.png\nb,a dog,\n")
    settings = SdxlTurboSettings(model=str(tiny_sdxl), device="cpu", width=64, height=64)
    backend = SdxlTurboBackend(settings.model_copy(update={"batch_size": 2}))
    enhanced = enhance_prompts(read_prompt_csv(csv).valid, TemplateEnhancer())
    planned = plan_images(enhanced, backend.target)
    storage = Storage(tmp_path / "storage")
    where = ImagesStepContext(storage=storage, prompt_set="set", run_id="r1")
    outcome = run_images_step(backend.target, lambda: backend, planned, where, log=lambda _: None)
    records = {r.prompt_id: r for r in outcome.records}
    control = json.loads(records["a"].control)
    assert control["type"] == "canny" and control["scale"] == 1.0 and len(control["sha256"]) == 64
    assert control["used_as"] == "controlnet" and len(control["map_sha256"]) == 64
    assert records["b"].control == ""
    folder = tmp_path / "storage" / "images" / "set" / "sdxl_turbo"
    by_id = {item.request.prompt_id: item for item in planned}
    edge_map = Image.open(folder / control_map_name(by_id["a"]))
    assert edge_map.size == (64, 64)
    assert control["map_sha256"] == hashlib.sha256(edge_map.convert("RGB").tobytes()).hexdigest()
    assert not (folder / control_map_name(by_id["b"])).exists()
    # An unchanged re-run makes nothing.
    again = run_images_step(backend.target, lambda: backend, planned, where, log=lambda _: None)
    assert again.generated == 0


def test_the_memory_plan_counts_a_controlnet_before_it_loads(tiny_sdxl: Path) -> None:
    """The planner's ControlNet share is read from the safetensors headers: the parameters the
    model holds once loaded, counted once (fp16 and fp32 files are one set of weights)."""
    settings = SdxlTurboSettings(model=str(tiny_sdxl), device="cpu", width=64, height=64)
    backend = SdxlTurboBackend(settings.model_copy(update={"batch_size": 1}))
    backend.load()
    nets = backend.controlnets
    planned = nets.planned_elements({"canny"})
    loaded = nets.pipeline_for("canny").controlnet
    assert planned == sum(p.numel() for p in loaded.parameters()) > 0
    assert nets.planned_elements({"canny"}) == 0  # loaded already: nothing more to fit


def test_a_replacement_keeps_its_rows_control_image(tmp_path: Path) -> None:
    # A rejected image made under a control image is made again under the same one: the
    # replacement changes the seed, not the composition asked for.
    from imagegen_pipeline.registry import MODELS
    from imagegen_pipeline.steps.regenerate import (
        Replacement,
        plan_replacements,
        planned,
        request_from_row,
    )

    layout = square(tmp_path / "layout.png")
    steered = control_of(str(layout), "canny", 0.5)
    assert steered is not None
    row = {
        "image_id": "a" * 64,
        "prompt_id": "steered",
        "image_index": 0,
        "prompt": "a lighthouse",
        "negative_prompt": "",
        "width": 64,
        "height": 64,
        "seed": 7,
        "loras": "",
        "control": steered.describe(),
        "replaces": None,
        "recorded_at": 1.0,
    }
    plain = row | {"image_id": "b" * 64, "prompt_id": "plain", "control": float("nan")}
    rows = pd.DataFrame([row, plain])
    target = MODELS["sdxl_turbo"].settings(width=64, height=64).image_target("sdxl_turbo", "m")
    wanted = [
        Replacement("s", "sdxl_turbo", row["image_id"]),
        Replacement("s", "sdxl_turbo", plain["image_id"]),
    ]
    plans, problems = plan_replacements(rows, wanted, target)
    assert problems == []
    by_prompt = {plan.request.prompt_id: plan.request for plan in plans}
    assert by_prompt["steered"].control == steered and by_prompt["steered"].seed != 7
    assert by_prompt["plain"].control is None  # a row without control (or an older row)

    # A replacement already made keeps its address when it is listed again by later images
    # steps, whatever became of the control image since (its row recorded the image's hash).
    made = row | {
        "image_id": next(plan.image_id for plan in plans if plan.request.prompt_id == "steered"),
        "seed": by_prompt["steered"].seed,
        "replaces": row["image_id"],
    }
    listed = planned(request_from_row(made, made["seed"]), target, made["replaces"])
    assert listed.image_id == made["image_id"]

    # The control image was moved away since: a new replacement is refused, saying why, and
    # the one already made is still listed under its address.
    layout.unlink()
    listed = planned(request_from_row(made, made["seed"]), target, made["replaces"])
    assert listed.image_id == made["image_id"]
    plans, problems = plan_replacements(rows, wanted, target)
    assert [plan.request.prompt_id for plan in plans] == ["plain"]
    assert problems == [f"steered[0]: its control image is gone ({layout})"]
