"""LoRA adapters: made with PEFT and saved with diffusers' own save_lora_weights (the layout
users download), read from a CSV cell, checked against the backend, switched without reloading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imagegen_pipeline.backends.base import ImageRequest
from imagegen_pipeline.backends.flux_schnell import FluxSchnellBackend, FluxSchnellSettings
from imagegen_pipeline.backends.sdxl_turbo import SdxlTurboBackend, SdxlTurboSettings
from imagegen_pipeline.lora import (
    LoraRef,
    check_fits,
    lora_targets,
    parse_lora_cell,
    resolve_lora,
)
from imagegen_pipeline.registry import MODELS
from tests.support.loras import make_lora


@pytest.fixture(scope="module")
def sdxl_loras(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("sdxl-loras")
    return [make_lora("sdxl_turbo", tiny_sdxl, folder / f"style{seed}", seed) for seed in (1, 2)]


@pytest.fixture(scope="module")
def flux_lora(tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora("flux_schnell", tiny_flux, tmp_path_factory.mktemp("flux-lora"), 3)


def test_a_cell_names_adapters_with_optional_scales() -> None:
    cell = "styles/brand.safetensors:0.8; detail-org/detail-lora:0.4 ;/abs/x.safetensors"
    assert parse_lora_cell(cell) == (
        LoraRef("styles/brand.safetensors", 0.8),
        LoraRef("detail-org/detail-lora", 0.4),
        LoraRef("/abs/x.safetensors", 1.0),
    )
    assert parse_lora_cell("") == ()
    with pytest.raises(ValueError, match="scale after ':' must be a number"):
        parse_lora_cell("brand.safetensors:strong")
    with pytest.raises(ValueError, match="outside"):
        parse_lora_cell("brand.safetensors:9")
    with pytest.raises(ValueError, match="named twice"):
        parse_lora_cell("a.safetensors;a.safetensors:0.5")


def test_adapters_resolve_relative_to_the_csv_and_know_their_targets(
    sdxl_loras: list[Path], flux_lora: Path, tmp_path: Path
) -> None:
    csv_folder = sdxl_loras[0].parent.parent
    by_folder = resolve_lora(LoraRef("style1", 0.5), csv_folder)  # a diffusers folder
    by_file = resolve_lora(LoraRef(str(sdxl_loras[0])), tmp_path)  # an absolute file
    assert by_folder.path == by_file.path == sdxl_loras[0].resolve()
    assert by_folder.sha256 == by_file.sha256 and by_folder.adapter_name == by_file.adapter_name
    assert by_folder.scale == 0.5
    assert lora_targets(sdxl_loras[0]) == {"unet"}
    assert lora_targets(flux_lora) == {"transformer"}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_lora(LoraRef("missing.safetensors"), tmp_path)
    with pytest.raises(FileNotFoundError, match="imagegen models pull someone/never-pulled"):
        resolve_lora(LoraRef("someone/never-pulled"), tmp_path)


def test_a_lora_for_another_model_is_refused(sdxl_loras: list[Path], flux_lora: Path) -> None:
    sdxl_lora = resolve_lora(LoraRef(str(sdxl_loras[0])), Path("."))
    flux = MODELS["flux_schnell"]
    with pytest.raises(ValueError, match="adapts unet, which flux_schnell does not have"):
        check_fits(sdxl_lora, flux.lora_components, flux.name)
    check_fits(sdxl_lora, MODELS["sdxl_turbo"].lora_components, "sdxl_turbo")
    flux_adapter = resolve_lora(LoraRef(str(flux_lora)), Path("."))
    check_fits(flux_adapter, flux.lora_components, flux.name)
    with pytest.raises(ValueError, match="gemini"):
        check_fits(flux_adapter, MODELS["gemini"].lora_components, "gemini")


def pixels(result) -> np.ndarray:
    assert result.status == "ok", result.error
    return np.asarray(result.image, dtype=np.float32)


def request(index: int, loras=()) -> ImageRequest:
    return ImageRequest("p", index, "a cat on a windowsill", "", 7, 64, 64, tuple(loras))


def test_adapters_change_the_image_and_switch_without_reloading(
    tiny_sdxl: Path, sdxl_loras: list[Path]
) -> None:
    one = resolve_lora(LoraRef(str(sdxl_loras[0])), Path("."))
    two = resolve_lora(LoraRef(str(sdxl_loras[1])), Path("."))
    off = resolve_lora(LoraRef(str(sdxl_loras[0]), 0.0), Path("."))
    settings = SdxlTurboSettings(model=str(tiny_sdxl), device="cpu", width=64, height=64)
    backend = SdxlTurboBackend(settings.model_copy(update={"batch_size": 2}))
    # Interleaved as a CSV would have them; the backend groups them by adapter set.
    requests = [request(0), request(1, [one]), request(2, [two]), request(3, [off]), request(4)]
    results = {r.request.image_index: pixels(r) for r in backend.generate(requests)}

    base = results[0]
    np.testing.assert_array_equal(results[4], base)  # the adapters left no trace
    assert np.abs(results[1] - base).mean() > 1.0  # a LoRA changes the image
    assert np.abs(results[2] - results[1]).mean() > 1.0  # two LoRAs, two images
    np.testing.assert_allclose(results[3], base, atol=1.0)  # scale 0: the base image
    assert backend.pipeline is not None and backend.model_loads == 1
    assert backend.adapters.loads == 2  # `one` at 1.0 and at 0.0 is one file, loaded once
    summary = backend.run_summary().metadata
    assert summary["adapter_loads"] == 2 and summary["adapter_switches"] >= 3

    # The step's next call (a best-of-N round) uses `two` again: switched to, not read again;
    # `one`, which it does not use, is freed.
    again = next(iter(backend.generate([request(1, [two])])))
    np.testing.assert_array_equal(pixels(again), results[2])
    assert backend.run_summary().metadata["adapter_loads"] == 0
    assert set(backend.adapters.loaded) == {two.adapter_name}
    # A call without adapters frees them all and makes the base image.
    plain = next(iter(backend.generate([request(0)])))
    np.testing.assert_array_equal(pixels(plain), base)
    assert backend.adapters.loaded == {}


def test_a_flux_lora_changes_flux_images(tiny_flux: Path, flux_lora: Path) -> None:
    adapter = resolve_lora(LoraRef(str(flux_lora)), Path("."))
    settings = FluxSchnellSettings(model=str(tiny_flux), device="cpu", width=64, height=64)
    backend = FluxSchnellBackend(settings.model_copy(update={"batch_size": 1}))
    results = {
        r.request.image_index: pixels(r)
        for r in backend.generate([request(0), request(1, [adapter])])
    }
    assert np.abs(results[1] - results[0]).mean() > 1.0


def test_the_csv_column_is_checked_per_row_and_drives_the_content_address(
    sdxl_loras: list[Path], tmp_path: Path
) -> None:
    import shutil

    from imagegen_pipeline.enhancement import enhance_prompts
    from imagegen_pipeline.enhancement.template import TemplateEnhancer
    from imagegen_pipeline.prompt_csv import read_prompt_csv
    from imagegen_pipeline.steps.images import plan_images

    styles = tmp_path / "styles"
    styles.mkdir()
    shutil.copy(sdxl_loras[0], styles / "brand.safetensors")
    csv = tmp_path / "set.csv"
    csv.write_text(
        "prompt_id,prompt,backends,lora\n"
        "plain,a cat,sdxl_turbo,\n"
        "brand,a cat,sdxl_turbo,styles/brand.safetensors:0.8\n"
        "missing,a dog,sdxl_turbo,styles/nowhere.safetensors\n"
        "wrong,a fox,,styles/brand.safetensors\n"  # every backend: FLUX has no UNet
    )
    table = read_prompt_csv(csv)
    assert list(table.valid["prompt_id"]) == ["plain", "brand"]
    assert table.valid.set_index("prompt_id").loc["brand", "lora"] == (
        f"{(styles / 'brand.safetensors').resolve()}:0.8"
    )
    reasons = {r["line"]: (r["field"], r["reason"]) for r in table.rejected.to_dict("records")}
    assert reasons[4][0] == "lora" and "nowhere.safetensors" in reasons[4][1]
    assert reasons[5][0] == "lora" and "which flux_schnell does not have" in reasons[5][1]

    target = MODELS["sdxl_turbo"].settings(width=64, height=64).image_target("sdxl_turbo", "m")

    def plan() -> dict[str, str]:
        enhanced = enhance_prompts(table.valid, TemplateEnhancer())
        return {item.request.prompt_id: item.image_id for item in plan_images(enhanced, target)}

    before = plan()
    assert plan() == before  # unchanged inputs, unchanged addresses
    # A changed LoRA file is other work for exactly the rows that use it.
    shutil.copy(sdxl_loras[1], styles / "brand.safetensors")
    after = plan()
    assert after["plain"] == before["plain"] and after["brand"] != before["brand"]
