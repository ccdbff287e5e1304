"""The FLUX.1-schnell and SDXL-Turbo backends on tiny random-weight models in the real layouts."""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from upath import UPath

from imagegen_pipeline.backends.base import ImageRequest
from imagegen_pipeline.backends.diffusers_text_to_image import DiffusersTextToImage
from imagegen_pipeline.backends.flux_schnell import FluxSchnellBackend, FluxSchnellSettings
from imagegen_pipeline.backends.sdxl_turbo import SdxlTurboBackend, SdxlTurboSettings
from imagegen_pipeline.image_files import read_png_record
from imagegen_pipeline.model_resolution import resolve_settings
from imagegen_pipeline.model_weights import ModelWeightsMissingError
from imagegen_pipeline.project_config import ProjectConfig
from imagegen_pipeline.registry import backend_spec
from imagegen_pipeline.run_metadata import load_run_metadata
from imagegen_pipeline.steps.images import ImagesStepContext, plan_images, run_images_step
from imagegen_pipeline.storage import Storage
from imagegen_pipeline.torch_runtime import resolve_dtype
from tests.conftest import TEST_IMAGE_SIDE

SIDE = TEST_IMAGE_SIDE
CPU = ProjectConfig(device="cpu")


def requests(count: int, side: int = SIDE) -> list[ImageRequest]:
    prompts = ["a cat on a mat", "a neon city at night", "an owl made of brass", "a red fox"]
    return [
        ImageRequest(f"p{i}", 0, prompts[i % len(prompts)], "", 100 + i, side, side)
        for i in range(count)
    ]


def make_flux(tiny_flux: Path, **settings: Any) -> FluxSchnellBackend:
    """The tiny FLUX on the CPU, at the test size unless ``settings`` say otherwise."""
    values = {"model": str(tiny_flux), "width": SIDE, "height": SIDE, "device": "cpu", **settings}
    return FluxSchnellBackend(FluxSchnellSettings(**values))


@pytest.fixture(params=["flux_schnell", "sdxl_turbo"])
def make_backend(request, tiny_flux: Path, tiny_sdxl: Path) -> Callable[..., DiffusersTextToImage]:
    def make(**settings: Any) -> DiffusersTextToImage:
        if request.param == "flux_schnell":
            return make_flux(tiny_flux, **settings)
        values = {"model": str(tiny_sdxl), "width": SIDE, "height": SIDE, "device": "cpu"}
        return SdxlTurboBackend(SdxlTurboSettings(**{**values, **settings}))

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


def record_initial_noise(backend: DiffusersTextToImage) -> list[torch.Tensor]:
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
    assert [r.details["batch_size"] for r in results] == [2, 2, 2, 2, 1]
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
    assert backend.run_summary().metadata["batch_size"] == 1  # what the step reports


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
        "p0": "ok",
        "p1": "ok",
        "p2": "failed",
        "p3": "ok",
    }
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


def test_automatic_memory_plan_on_the_cpu(make_backend):
    backend = make_backend(batch_size=None, offload="auto", max_batch_size=3)
    backend.load()
    summary = backend.run_summary().metadata
    batch = summary["batch_size"]
    # A tiny model fits whole in the host's memory: nothing to offload on a CPU anyway.
    assert summary["offload"] == "none"
    assert isinstance(batch, int) and not isinstance(batch, bool) and 1 <= batch <= 3
    assert isinstance(summary["memory_plan"], str)
    assert f"batch {batch}" in summary["memory_plan"] and "no offload" in summary["memory_plan"]
    # The planned batch size is the one the pipeline is called with.
    spy = backend.pipeline = PipelineSpy(backend.pipeline)
    assert [r.status for r in backend.generate(requests(5))] == ["ok"] * 5
    assert max(spy.batch_sizes) == batch and sum(spy.batch_sizes) == 5


def test_offload_and_batch_set_by_hand_are_not_planned(make_backend):
    backend = make_backend(batch_size=2, offload="none")
    backend.load()
    summary = backend.run_summary().metadata
    assert (summary["offload"], summary["batch_size"]) == ("none", 2)
    assert summary["memory_plan"] == "offload and batch size set by hand"


def test_unresolved_settings_are_refused(tiny_flux):
    with pytest.raises(ValueError, match="resolve the settings first"):
        FluxSchnellBackend(FluxSchnellSettings(model=str(tiny_flux), device="cpu"))


def test_missing_hub_weights_name_the_repo_and_the_fix():
    settings = FluxSchnellSettings(
        model="black-forest-labs/FLUX.1-schnell", width=SIDE, height=SIDE, device="cpu"
    )
    backend = FluxSchnellBackend(settings)
    with pytest.raises(ModelWeightsMissingError) as error:
        backend.load()
    message = str(error.value)
    assert "'black-forest-labs/FLUX.1-schnell' (revision main) are not on this machine" in message
    assert "imagegen models pull black-forest-labs/FLUX.1-schnell" in message
    assert "HF_HUB_OFFLINE" in message


def test_missing_local_folder_is_named(tmp_path):
    settings = SdxlTurboSettings(
        model=str(tmp_path / "nowhere"), width=SIDE, height=SIDE, device="cpu"
    )
    backend = SdxlTurboBackend(settings)
    with pytest.raises(ModelWeightsMissingError, match="nowhere"):
        backend.load()


def test_defaults_match_the_model_cards(tiny_flux):
    flux, sdxl = FluxSchnellSettings(), SdxlTurboSettings()
    assert (flux.steps, flux.guidance, flux.max_sequence_length) == (4, 0.0, 256)
    assert (sdxl.steps, sdxl.guidance) == (1, 0.0)
    flux_spec, sdxl_spec = backend_spec("flux_schnell"), backend_spec("sdxl_turbo")
    assert flux_spec.default_model == "black-forest-labs/FLUX.1-schnell"
    assert sdxl_spec.default_model == "stabilityai/sdxl-turbo"

    # Real weights: the model cards' sizes; the device comes from the project.
    real_flux, _ = resolve_settings(
        flux_spec, FluxSchnellSettings(model=flux_spec.default_model), CPU
    )
    real_sdxl, _ = resolve_settings(
        sdxl_spec, SdxlTurboSettings(model=sdxl_spec.default_model), CPU
    )
    assert FluxSchnellBackend(real_flux).default_size == (1024, 1024)
    assert SdxlTurboBackend(real_sdxl).default_size == (512, 512)
    assert FluxSchnellBackend(real_flux).device == "cpu"
    # The tiny stand-in: small images, so a CPU finishes in seconds.
    tiny, resolved = resolve_settings(flux_spec, FluxSchnellSettings(model=str(tiny_flux)), CPU)
    assert resolved is not None and resolved.is_tiny
    assert FluxSchnellBackend(tiny).default_size == (256, 256)

    # The models' own precision on a GPU, float32 on a CPU.
    cuda = torch.device("cuda")
    assert resolve_dtype("auto", FluxSchnellBackend.spec.dtype, cuda) is torch.bfloat16
    assert resolve_dtype("auto", SdxlTurboBackend.spec.dtype, cuda) is torch.float16
    assert FluxSchnellBackend(real_flux).dtype is torch.float32
    assert SdxlTurboBackend.spec.variant == "fp16" and FluxSchnellBackend.spec.variant is None


# --- the images step's writers (overlapped output writing) ----------------------------------


class ThreadRecordingStorage(Storage):
    """Storage that notes which thread wrote each PNG."""

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.png_writers: list[str] = []
        self._lock = threading.Lock()

    def write_bytes(self, path: UPath, data: bytes) -> None:
        if path.suffix == ".png":
            with self._lock:
                self.png_writers.append(threading.current_thread().name)
        super().write_bytes(path, data)


def enhanced_prompts() -> pd.DataFrame:
    """Seven images for flux_schnell over three prompts, and one prompt it is not asked for."""
    rows = [
        ("cat", "a cat asleep on a windowsill", 11, 3, ["flux_schnell"]),
        ("city", "a neon city street in the rain", None, 2, ["flux_schnell", "sdxl_turbo"]),
        ("owl", "a brass clockwork owl", None, 2, ["flux_schnell"]),
        ("fox", "a red fox in the snow", None, 2, ["sdxl_turbo"]),
    ]
    table = pd.DataFrame(
        [
            {
                "prompt_id": prompt_id,
                "enhanced_prompt": prompt,
                "negative_prompt": "",
                "seed": seed,
                "width": None,
                "height": None,
                "num_images": count,
                "backends": backends,
            }
            for prompt_id, prompt, seed, count, backends in rows
        ]
    )
    for column in ("seed", "width", "height"):
        table[column] = table[column].astype("Int64")
    return table


def test_writer_threads_do_not_change_what_is_written(tiny_flux, tmp_path):
    backend = make_flux(tiny_flux, batch_size=2)
    planned = plan_images(enhanced_prompts(), backend.target)
    assert [(p.request.prompt_id, p.request.image_index) for p in planned] == [
        ("cat", 0),
        ("cat", 1),
        ("cat", 2),
        ("city", 0),
        ("city", 1),
        ("owl", 0),
        ("owl", 1),
    ]
    assert [p.request.seed for p in planned[:3]] == [11, 12, 13]

    runs = {}
    for threads in (0, 2):
        storage = ThreadRecordingStorage(tmp_path / f"writers-{threads}")
        step = ImagesStepContext(storage, "set", run_id=f"run-{threads}", writer_threads=threads)
        outcome = run_images_step(
            backend.target, lambda: backend, planned, step, log=lambda _: None
        )
        runs[threads] = (storage, outcome.records)

    (inline_storage, inline), (threaded_storage, threaded) = runs[0], runs[2]
    assert inline_storage.png_writers == ["MainThread"] * 7  # written on the model thread
    assert len(threaded_storage.png_writers) == 7
    assert all(name.startswith("writer") for name in threaded_storage.png_writers)

    assert [r.image_id for r in inline] == [p.image_id for p in planned]
    assert [r.image_id for r in threaded] == [p.image_id for p in planned]
    assert [r.status for r in inline] == [r.status for r in threaded] == ["ok"] * 7
    assert [r.batch_size for r in inline] == [r.batch_size for r in threaded] == [2] * 6 + [1]
    for storage, _ in runs.values():
        rows = load_run_metadata(storage, "images", prompt_set="set", backend="flux_schnell")
        assert list(rows["image_id"]) == [p.image_id for p in planned]  # in production order

    decoded = []
    for item, a, b in zip(planned, inline, threaded, strict=True):
        files = []
        for record in (a, b):
            assert record.path.endswith(item.relative_path)
            png = Path(record.path).read_bytes()
            assert record.sha256 == hashlib.sha256(png).hexdigest()
            parameters, generation = read_png_record(png)
            # Every file describes its own image: a writer never mixes two items up.
            assert (parameters["image_id"], parameters["prompt_id"], parameters["seed"]) == (
                item.image_id,
                item.request.prompt_id,
                item.request.seed,
            )
            assert generation["run_id"] == record.run_id
            with Image.open(io.BytesIO(png)) as image:
                files.append((np.asarray(image.convert("RGB")), parameters))
        (inline_pixels, inline_parameters), (threaded_pixels, threaded_parameters) = files
        assert np.array_equal(inline_pixels, threaded_pixels)
        assert inline_parameters == threaded_parameters
        decoded.append(inline_pixels)
    # Seven different images, so a swapped file could not pass the comparison above.
    assert len({pixels.tobytes() for pixels in decoded}) == 7
