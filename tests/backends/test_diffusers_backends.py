"""The FLUX.1-schnell and SDXL-Turbo backends on tiny random-weight models in the real layouts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from imagegen_pipeline.backends.base import ImageRequest
from imagegen_pipeline.backends.diffusers_backend import DiffusersImageBackend
from imagegen_pipeline.backends.flux_schnell import FluxSchnellBackend, FluxSchnellConfig
from imagegen_pipeline.backends.sdxl_turbo import SdxlTurboBackend, SdxlTurboConfig
from imagegen_pipeline.model_weights import ModelWeightsMissingError

SIDE = 64


def requests(count: int, side: int = SIDE) -> list[ImageRequest]:
    prompts = ["a cat on a mat", "a neon city at night", "an owl made of brass", "a red fox"]
    return [
        ImageRequest(f"p{i}", 0, prompts[i % len(prompts)], "", 100 + i, side, side)
        for i in range(count)
    ]


@pytest.fixture(params=["flux_schnell", "sdxl_turbo"])
def make_backend(request, tiny_flux: Path, tiny_sdxl: Path) -> Callable[..., DiffusersImageBackend]:
    def make(**config: Any) -> DiffusersImageBackend:
        if request.param == "flux_schnell":
            return FluxSchnellBackend(FluxSchnellConfig(model=str(tiny_flux), **config))
        return SdxlTurboBackend(SdxlTurboConfig(model=str(tiny_sdxl), **config))

    return make


class PipelineSpy:
    """Wraps the real pipeline: records each call's batch size, optionally injects a fault."""

    def __init__(self, pipeline: Any, fault: Callable[[dict], None] | None = None) -> None:
        self.pipeline = pipeline
        self.fault = fault
        self.batch_sizes: list[int] = []

    def __call__(self, **kwargs: Any) -> Any:
        self.batch_sizes.append(len(kwargs["prompt"]))
        if self.fault:
            self.fault(kwargs)
        return self.pipeline(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipeline, name)


def record_initial_noise(backend: DiffusersImageBackend) -> list[torch.Tensor]:
    """Record the latents each call starts from (the real prepare_latents runs unchanged)."""
    recorded: list[torch.Tensor] = []
    original = backend.pipeline.prepare_latents

    def prepare_latents(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        recorded.append((out[0] if isinstance(out, tuple) else out).clone())
        return out

    backend.pipeline.prepare_latents = prepare_latents
    return recorded


def test_one_call_per_batch_and_one_load(make_backend):
    backend = make_backend(batch_size=2)
    backend.load()
    spy = backend.pipeline = PipelineSpy(backend.pipeline)
    results = list(backend.generate(requests(5)))

    assert [r.status for r in results] == ["ok"] * 5
    assert spy.batch_sizes == [2, 2, 1]
    assert backend.model_loads == 1
    assert all(r.image.size == (SIDE, SIDE) for r in results)
    pixels = [np.asarray(r.image) for r in results]
    assert pixels[0].std() > 1, "a random-weight model draws noise, never a solid image"
    assert not np.array_equal(pixels[0], pixels[1])


def test_an_image_regenerated_alone_matches_the_batched_one(make_backend):
    batched_backend = make_backend(batch_size=3)
    batched_backend.load()
    batched_noise = record_initial_noise(batched_backend)
    batched = list(batched_backend.generate(requests(3)))

    single_backend = make_backend(batch_size=1)
    single_backend.load()
    single_noise = record_initial_noise(single_backend)
    alone = list(single_backend.generate(requests(3)[2:]))

    # Same seed, same generator: bit-identical initial noise whatever the batch.
    assert torch.equal(batched_noise[0][2], single_noise[0][0])
    difference = np.abs(
        np.asarray(batched[2].image, dtype=np.int16) - np.asarray(alone[0].image, dtype=np.int16)
    )
    # Batched and single matmuls may round differently: allow a few levels out of 255.
    assert difference.mean() < 1.0 and difference.max() <= 8
    assert not np.array_equal(np.asarray(batched[1].image), np.asarray(alone[0].image))


def test_out_of_memory_halves_the_batch_down_to_one(make_backend):
    def out_of_memory_above_one(kwargs: dict) -> None:
        if len(kwargs["prompt"]) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    backend = make_backend(batch_size=4)
    backend.load()
    spy = backend.pipeline = PipelineSpy(backend.pipeline, out_of_memory_above_one)
    results = list(backend.generate(requests(5)))

    assert [r.status for r in results] == ["ok"] * 5
    assert spy.batch_sizes == [4, 2, 1, 1, 1, 1, 1]  # 4 -> 2 -> 1, then the rest at 1
    assert backend.batch_size == 1


def test_out_of_memory_at_batch_one_fails_that_image_only(make_backend):
    def out_of_memory_for_owls(kwargs: dict) -> None:
        if any("owl" in prompt for prompt in kwargs["prompt"]):
            raise torch.OutOfMemoryError("CUDA out of memory.")

    backend = make_backend(batch_size=1)
    backend.load()
    backend.pipeline = PipelineSpy(backend.pipeline, out_of_memory_for_owls)
    statuses = {r.request.prompt_id: r.status for r in backend.generate(requests(4))}
    assert statuses == {"p0": "ok", "p1": "ok", "p2": "failed", "p3": "ok"}


def test_a_failing_prompt_fails_alone(make_backend):
    def reject_owls(kwargs: dict) -> None:
        if any("owl" in prompt for prompt in kwargs["prompt"]):
            raise ValueError("cannot draw owls")

    backend = make_backend(batch_size=4)
    backend.load()
    backend.pipeline = PipelineSpy(backend.pipeline, reject_owls)
    results = {r.request.prompt_id: r for r in backend.generate(requests(4))}

    assert {k: r.status for k, r in results.items()} == {
        "p0": "ok", "p1": "ok", "p2": "failed", "p3": "ok"
    }  # fmt: skip
    assert results["p2"].error == "ValueError: cannot draw owls"
    assert results["p2"].image is None


def test_sizes_are_batched_separately(make_backend):
    backend = make_backend(batch_size=4)
    backend.load()
    spy = backend.pipeline = PipelineSpy(backend.pipeline)
    mixed = requests(2, side=64) + requests(2, side=128)
    sizes = {
        r.request.prompt_id + str(r.request.width): r.image.size for r in backend.generate(mixed)
    }
    assert spy.batch_sizes == [2, 2]
    assert sizes == {"p064": (64, 64), "p164": (64, 64), "p0128": (128, 128), "p1128": (128, 128)}


def test_missing_hub_weights_name_the_repo_and_the_fix():
    backend = FluxSchnellBackend(FluxSchnellConfig(model="black-forest-labs/FLUX.1-schnell"))
    with pytest.raises(ModelWeightsMissingError) as error:
        backend.load()
    message = str(error.value)
    assert "'black-forest-labs/FLUX.1-schnell' (revision main) are not on this machine" in message
    assert "imagegen models pull black-forest-labs/FLUX.1-schnell" in message
    assert "HF_HUB_OFFLINE" in message


def test_missing_local_folder_is_named(tmp_path):
    backend = SdxlTurboBackend(SdxlTurboConfig(model=str(tmp_path / "nowhere")))
    with pytest.raises(ModelWeightsMissingError, match="nowhere"):
        backend.load()


def test_defaults_match_the_model_cards():
    flux = FluxSchnellConfig()
    sdxl = SdxlTurboConfig()
    assert (flux.model, flux.steps, flux.guidance, flux.max_sequence_length) == (
        "black-forest-labs/FLUX.1-schnell", 4, 0.0, 256
    )  # fmt: skip
    assert (sdxl.model, sdxl.steps, sdxl.guidance) == ("stabilityai/sdxl-turbo", 1, 0.0)
    assert FluxSchnellBackend.preferred_dtype is torch.bfloat16
    assert SdxlTurboBackend.preferred_dtype is torch.float16 and SdxlTurboBackend.variant == "fp16"
    assert (FluxSchnellBackend.default_width, SdxlTurboBackend.default_width) == (1024, 512)
