"""SVD on the tiny random-weight model: arguments, determinism, and the out-of-memory ladder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from imagegen_pipeline.model_resolution import resolve_settings
from imagegen_pipeline.model_weights import ModelWeightsMissingError
from imagegen_pipeline.project_config import ProjectConfig
from imagegen_pipeline.registry import SVD
from imagegen_pipeline.torch_runtime import resolve_dtype
from imagegen_pipeline.video.svd import SvdGenerator, SvdSettings, conditioning_image
from imagegen_pipeline.video.video_clip import video_clip_seed

SVD_XT = "stabilityai/stable-video-diffusion-img2vid-xt"
SMALL = {"width": 64, "height": 64, "num_frames": 3, "steps": 1, "max_guidance_scale": 1.0}
CPU = ProjectConfig(device="cpu")


def svd_settings(model: str | Path, **settings: Any) -> SvdSettings:
    """Settings resolved as a step resolves them (None filled in), on the CPU."""
    resolved, _ = resolve_settings(SVD, SvdSettings(model=str(model), **settings), CPU)
    return resolved


def noise_image(seed: int = 0, size: tuple[int, int] = (96, 80)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


class SvdSpy:
    """Wraps the real pipeline: records each call's arguments, optionally injects a fault."""

    def __init__(self, pipeline: Any, fault: Callable[[dict], None] | None = None) -> None:
        self.pipeline = pipeline
        self.fault = fault
        self.calls: list[dict] = []

    def __call__(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        if self.fault:
            self.fault(kwargs)
        return self.pipeline(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipeline, name)


def forward_chunking_on(pipeline: Any) -> bool:
    """True once the real UNet's transformer blocks feed forward in chunks."""
    return any(getattr(m, "_chunk_size", None) for m in pipeline.unet.modules())


def offloaded(pipeline: Any) -> bool:
    """True once accelerate's offload hooks sit on the real UNet."""
    return hasattr(pipeline.unet, "_hf_hook")


@pytest.fixture
def make_generator(tiny_svd: Path) -> Callable[..., SvdGenerator]:
    def make(**settings: Any) -> SvdGenerator:
        generator = SvdGenerator(svd_settings(tiny_svd, **{**SMALL, **settings}))
        generator.load()
        return generator

    return make


def test_defaults_match_the_model_card():
    assert SVD.default_model == SVD_XT
    settings = svd_settings(SVD_XT)  # real weights: the model card's values fill every None
    assert (settings.width, settings.height, settings.num_frames, settings.steps) == (
        1024,
        576,
        25,
        25,
    )
    assert (settings.fps, settings.motion_bucket_id, settings.noise_aug_strength) == (7, 127, 0.02)
    assert (settings.decode_chunk_size, settings.min_guidance_scale) == (8, 1.0)
    assert settings.max_guidance_scale == 3.0
    assert SVD.variant == "fp16"
    # fp16 only where it is fast; float32 on the CPU.
    cuda = torch.device("cuda")
    assert resolve_dtype("auto", SVD.dtype, cuda) is torch.float16
    assert SvdGenerator(settings)._dtype is torch.float32


def test_a_tiny_build_gets_small_fast_defaults(tiny_svd):
    settings = svd_settings(tiny_svd)
    assert (settings.width, settings.height) == (64, 64)
    assert settings.num_frames < 25 and settings.steps < 25
    assert settings.device == "cpu"
    # A value set explicitly is kept.
    assert svd_settings(tiny_svd, num_frames=3).num_frames == 3


@pytest.mark.parametrize(
    "bad", [{"width": 100}, {"height": 56}, {"width": 56}, {"num_frames": 0}, {"steps": 0}]
)
def test_invalid_settings_are_refused(bad, tiny_svd):
    with pytest.raises(ValueError):
        SvdGenerator(svd_settings(tiny_svd, **{**SMALL, **bad}))


def test_unresolved_settings_are_refused():
    with pytest.raises(ValueError):
        SvdGenerator(SvdSettings(model=SVD_XT, device="cpu"))


def test_conditioning_image_is_scaled_to_cover_and_centre_cropped():
    stripes = Image.new("RGB", (300, 100))
    for index, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        stripes.paste(colour, (100 * index, 0, 100 * (index + 1), 100))
    square = conditioning_image(stripes, 64, 64)
    assert square.size == (64, 64)
    pixels = np.asarray(square)
    assert (pixels[:, 8:56, 1] > 200).all() and (pixels[:, 8:56, [0, 2]] < 50).all()
    assert conditioning_image(stripes, 128, 64).size == (128, 64)


def test_one_call_per_clip_with_the_configured_settings(make_generator):
    generator = make_generator(fps=9, motion_bucket_id=60, noise_aug_strength=0.1)
    spy = generator.pipeline = SvdSpy(generator.pipeline)
    result = generator.generate(noise_image(), seed=5)

    assert result.status == "ok" and result.memory_fallback is None
    assert len(result.frames) == 3 and result.frames[0].size == (64, 64)
    (call,) = spy.calls
    assert {k: call[k] for k in ("width", "height", "num_frames", "num_inference_steps")} == {
        "width": 64,
        "height": 64,
        "num_frames": 3,
        "num_inference_steps": 1,
    }
    assert (call["fps"], call["motion_bucket_id"], call["noise_aug_strength"]) == (9, 60, 0.1)
    assert call["image"].size == (64, 64)  # resized before the pipeline
    assert call["generator"].device.type == "cpu"
    assert generator.model_loads == 1


def test_the_seed_alone_decides_the_clip(make_generator):
    generator = make_generator()
    first = generator.generate(noise_image(), seed=1)
    again = generator.generate(noise_image(), seed=1)
    other = generator.generate(noise_image(), seed=2)
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(first.frames, again.frames, strict=True)
    )
    assert not np.array_equal(np.asarray(first.frames[1]), np.asarray(other.frames[1]))
    assert video_clip_seed("abc") == video_clip_seed("abc") != video_clip_seed("abd")
    assert 0 <= video_clip_seed("abc") < 2**31


def test_out_of_memory_walks_down_the_ladder(make_generator):
    generator = make_generator(decode_chunk_size=4)

    def out_of_memory_until_offloaded(kwargs: dict) -> None:
        if not offloaded(generator.pipeline.pipeline):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    spy = generator.pipeline = SvdSpy(generator.pipeline, out_of_memory_until_offloaded)
    result = generator.generate(noise_image(), seed=3)

    assert result.status == "ok", result.error
    # decode chunk 4 -> 2 -> 1, then chunked feed-forward, then model CPU offload.
    assert [call["decode_chunk_size"] for call in spy.calls] == [4, 2, 1, 1, 1]
    assert forward_chunking_on(spy.pipeline) and offloaded(spy.pipeline)
    assert result.memory_fallback == "decode_chunk_size=1+forward_chunking+model_cpu_offload"
    # The next clip starts on the rung that worked, without new failures.
    spy.calls.clear()
    assert generator.generate(noise_image(1), seed=4).status == "ok"
    assert len(spy.calls) == 1


def test_a_smaller_decode_chunk_is_the_first_rung(make_generator):
    generator = make_generator(decode_chunk_size=8)

    def out_of_memory_above_two(kwargs: dict) -> None:
        if kwargs["decode_chunk_size"] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory.")

    spy = generator.pipeline = SvdSpy(generator.pipeline, out_of_memory_above_two)
    result = generator.generate(noise_image(), seed=3)
    assert result.status == "ok" and result.memory_fallback == "decode_chunk_size=2"
    assert [call["decode_chunk_size"] for call in spy.calls] == [8, 4, 2]
    assert not forward_chunking_on(spy.pipeline) and not offloaded(spy.pipeline)


def test_a_clip_fails_only_when_the_ladder_is_exhausted(make_generator):
    generator = make_generator(decode_chunk_size=2)

    def always_out_of_memory(kwargs: dict) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory.")

    spy = generator.pipeline = SvdSpy(generator.pipeline, always_out_of_memory)
    result = generator.generate(noise_image(), seed=3)
    assert result.status == "failed" and "OutOfMemoryError" in result.error
    assert result.memory_fallback == "decode_chunk_size=1+forward_chunking+model_cpu_offload"
    assert len(spy.calls) == 4  # 2, 1, +forward chunking, +offload
    assert result.frames == []


def test_other_errors_fail_the_clip_without_the_ladder(make_generator):
    generator = make_generator()

    def broken(kwargs: dict) -> None:
        raise ValueError("bad conditioning image")

    spy = generator.pipeline = SvdSpy(generator.pipeline, broken)
    result = generator.generate(noise_image(), seed=3)
    assert (result.status, result.error) == ("failed", "ValueError: bad conditioning image")
    assert len(spy.calls) == 1 and result.memory_fallback is None


def test_missing_weights_name_the_repo_and_the_fix(tmp_path):
    with pytest.raises(ModelWeightsMissingError, match="imagegen models pull " + SVD_XT):
        SvdGenerator(svd_settings(SVD_XT)).load()
    with pytest.raises(ModelWeightsMissingError, match="nowhere"):
        SvdGenerator(svd_settings(tmp_path / "nowhere", **SMALL)).load()
