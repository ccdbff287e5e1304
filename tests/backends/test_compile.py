"""Speed mode: a compiled denoiser gives the eager images, and a LoRA switch under compile
hotswaps into fixed slots without recompiling (counted by torch._dynamo's own counters).

Compiling is the slow part on this CPU (tens of seconds per model with inductor), so each
compiled backend is built once per module and does all its checks; the eager reference is the
same requests through the uncompiled backend.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from imagegen_pipeline.backends.adapters import AdapterSwitcher
from imagegen_pipeline.backends.base import ImageRequest
from imagegen_pipeline.backends.compilation import CompileWatch
from imagegen_pipeline.backends.flux_schnell import FluxSchnellBackend, FluxSchnellSettings
from imagegen_pipeline.backends.sdxl_turbo import SdxlTurboBackend, SdxlTurboSettings
from imagegen_pipeline.lora import LoraAdapter, LoraRef, lora_elements, lora_rank, resolve_lora
from tests.support.loras import make_lora

# Compiled kernels reorder float sums: a pixel may move by a few levels of 255 (5 seen on
# the tiny SDXL with inductor), the image as a whole by a fraction of one; a LoRA moves it by
# more than ten on average.
MAX_PIXEL_DIFF = 8.0
MEAN_PIXEL_DIFF = 0.25


def pixels(result) -> np.ndarray:
    assert result.status == "ok", result.error
    return np.asarray(result.image, dtype=np.float32)


def request(index: int, loras=()) -> ImageRequest:
    return ImageRequest("p", index, "a cat on a windowsill", "", 7, 64, 64, tuple(loras))


def generate(backend, requests) -> dict[int, np.ndarray]:
    return {r.request.image_index: pixels(r) for r in backend.generate(requests)}


def assert_close(got: dict[int, np.ndarray], expected: dict[int, np.ndarray]) -> None:
    for index, image in expected.items():
        difference = np.abs(got[index] - image)
        assert difference.max() <= MAX_PIXEL_DIFF, (index, difference.max())
        assert difference.mean() <= MEAN_PIXEL_DIFF, (index, difference.mean())


@pytest.fixture(scope="module")
def sdxl_adapters(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("compile-sdxl-loras")
    return [make_lora("sdxl_turbo", tiny_sdxl, folder / f"style{seed}", seed) for seed in (1, 2)]


@pytest.fixture(scope="module")
def flux_adapters(tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("compile-flux-loras")
    return [make_lora("flux_schnell", tiny_flux, folder / f"style{seed}", seed) for seed in (3, 4)]


def adapter(path: Path, scale: float = 1.0) -> LoraAdapter:
    return resolve_lora(LoraRef(str(path), scale), Path("/"))


def test_the_watch_counts_a_recompile_and_only_after_the_first_call() -> None:
    # A denoiser without _repeated_blocks: regional compiles each member of its block lists.
    class Denoiser(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return x

    torch._dynamo.reset()
    pipeline = SimpleNamespace(unet=Denoiser())
    watch = CompileWatch("regional", backend="eager")
    watch.apply(pipeline)
    assert "2 blocks" in watch.compiled
    watch.reset_counts()
    pipeline.unet(torch.ones(2, 4))
    watch.after_call()
    assert watch.graphs >= 1 and watch.recompiles == 0 and watch.seconds > 0
    pipeline.unet(torch.ones(2, 4))  # same shape: the compiled graph is reused
    watch.after_call()
    assert watch.recompiles == 0
    pipeline.unet(torch.ones(3, 4))  # a new batch size: dynamo compiles again
    watch.after_call()
    assert watch.recompiles >= 1
    assert watch.summary()["recompiles"] == watch.recompiles


def check_compiled_backend(compiled, eager, one: Path, two: Path) -> None:
    """The compiled backend's images equal the eager ones; switching recompiles nothing."""
    a, b = adapter(one), adapter(two, 0.5)
    off = adapter(one, 0.0)
    first = [request(0), request(1, [a]), request(2, [b]), request(3, [off]), request(4, [a, b])]
    expected = generate(eager, first)
    got = generate(compiled, first)
    assert_close(got, expected)
    assert np.abs(got[1] - got[0]).mean() > 1.0  # the LoRA acts under compile
    assert np.abs(got[2] - got[1]).mean() > 1.0  # and the hotswapped one is another
    summary = compiled.run_summary().metadata
    assert summary["compile_seconds"] > 0 and compiled.compile_watch.graphs > 0
    assert summary["recompiles"] == 0, "a LoRA switch recompiled the denoiser"
    # Two slots (image 4 uses two LoRAs); adapters stay loaded, hotswapped in place.
    assert [slot.sha256 for slot in compiled.adapters.slots] == [a.sha256, b.sha256]

    # The next step on the warm compiled model: other order, other scales, no compiling.
    second = [request(5, [b]), request(6, [adapter(one, 0.7)]), request(7)]
    got = generate(compiled, second)
    summary = compiled.run_summary().metadata
    assert summary["recompiles"] == 0 and compiled.compile_watch.graphs == 0
    assert summary["compile_seconds"] == 0.0
    assert summary["adapter_switches"] >= 2
    assert_close(got, generate(eager, second))
    assert compiled.model_loads == 1


def test_regional_sdxl_turbo_matches_eager_and_switches_loras_without_recompiling(
    tiny_sdxl: Path, sdxl_adapters: list[Path]
) -> None:
    torch._dynamo.reset()
    settings = SdxlTurboSettings(
        model=str(tiny_sdxl), device="cpu", width=64, height=64, batch_size=1
    )
    # Slots padded to rank 8 (the LoRAs are rank 4): padding must not change the images.
    compiled = SdxlTurboBackend(
        settings.model_copy(update={"compile": "regional", "hotswap_rank": 8})
    )
    check_compiled_backend(compiled, SdxlTurboBackend(settings), *sdxl_adapters)
    assert "BasicTransformerBlock" in compiled.compile_watch.compiled
    assert compiled.adapters.hotswap_rank == 8


def test_full_flux_schnell_matches_eager_and_switches_loras_without_recompiling(
    tiny_flux: Path, flux_adapters: list[Path]
) -> None:
    torch._dynamo.reset()
    settings = FluxSchnellSettings(
        model=str(tiny_flux), device="cpu", width=64, height=64, batch_size=1
    )
    # aot_eager: dynamo's graphs and guards (what recompiles) without inductor's kernel
    # build, which would double this test's time; SDXL above runs inductor.
    compiled = FluxSchnellBackend(
        settings.model_copy(update={"compile": "full", "compile_backend": "aot_eager"})
    )
    check_compiled_backend(compiled, FluxSchnellBackend(settings), *flux_adapters)
    assert "whole model" in compiled.compile_watch.compiled


def test_hotswap_refuses_what_would_recompile_or_cannot_swap(sdxl_adapters: list[Path]) -> None:
    lora = adapter(sdxl_adapters[0])
    switcher = AdapterSwitcher(pipeline=None, hotswap=True, hotswap_rank=2, slots=[lora])
    with pytest.raises(ValueError, match="rank 4 cannot be hotswapped into slots of rank 2"):
        switcher.prepare([[lora]])
    text_lora = LoraAdapter(lora.source, lora.path, lora.sha256, 1.0, frozenset({"text_encoder"}))
    with pytest.raises(ValueError, match="adapts a text encoder"):
        AdapterSwitcher(pipeline=None, hotswap=True).prepare([[text_lora]])


def test_adapter_bytes_for_the_planner(sdxl_adapters: list[Path]) -> None:
    one, two = adapter(sdxl_adapters[0]), adapter(sdxl_adapters[1], 0.5)
    elements = lora_elements(one.path)["unet"]
    assert lora_rank(one.path) == 4 and elements > 0
    sets = [[one], [two], [one, two]]
    eager = AdapterSwitcher(pipeline=None)
    # Eager: each distinct adapter once (a file at two scales is one load), in the dtype.
    assert eager.planned_bytes(sets, 2) == {"unet": 2 * elements * 2}
    assert eager.planned_bytes([[one], [adapter(one.path, 0.3)]], 4) == {"unet": elements * 4}
    # Hotswap: two slots (one image uses two), each padded from rank 4 to 8.
    slots = AdapterSwitcher(pipeline=None, hotswap=True, hotswap_rank=8)
    assert slots.planned_bytes(sets, 2) == {"unet": 2 * elements * 2 * 2}
    assert eager.planned_bytes([[]], 2) == {}


def test_the_batch_is_planned_with_the_loras_a_step_loads(
    tiny_sdxl: Path, sdxl_adapters: list[Path]
) -> None:
    settings = SdxlTurboSettings(model=str(tiny_sdxl), device="cpu", width=64, height=64)
    backend = SdxlTurboBackend(settings)  # batch_size None: the planner's
    backend.load()
    base_unet = backend.memory_plan.weights_bytes["unet"]
    generate(backend, [request(0, [adapter(sdxl_adapters[0])])])
    # float32 on the CPU: 4 bytes per LoRA parameter, on the component it adapts.
    added = lora_elements(sdxl_adapters[0])["unet"] * 4
    assert backend.memory_plan.weights_bytes["unet"] == base_unet + added
    assert "LoRA adapters" in backend.memory_plan.reason
