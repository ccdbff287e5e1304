"""The tiny random-weight models: real repo layouts, loaded by the real loaders, offline, fast."""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagegen_pipeline import tiny_models
from imagegen_pipeline.registry import MODELS
from imagegen_pipeline.tiny_models import MARKER_NAME, build_tiny_model, is_tiny_model

# Every model with a tiny stand-in, by name; each declares its builder in its own module.
TINY_MODELS = {name: spec for name, spec in MODELS.items() if spec.tiny_builder}
REAL_REPOS = {name: spec.default_model for name, spec in TINY_MODELS.items()}
TINY_MODEL_DIRS = {name: spec.tiny_dir_name for name, spec in TINY_MODELS.items()}

# Files each real repo has that the loaders read (sharded weights are checked separately).
EXPECTED_FILES = {
    "flux_schnell": [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder_2/config.json",
        "text_encoder_2/model.safetensors.index.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer_2/tokenizer.json",
        "tokenizer_2/tokenizer_config.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ],
    "sdxl_turbo": [
        "model_index.json",
        "scheduler/scheduler_config.json",
        *(f"tokenizer{s}/{f}" for s in ("", "_2") for f in ("vocab.json", "merges.txt")),
        *(f"tokenizer{s}/tokenizer_config.json" for s in ("", "_2")),
        *(
            f"{sub}/{stem}{variant}.safetensors"
            for sub, stem in [
                ("text_encoder", "model"),
                ("text_encoder_2", "model"),
                ("unet", "diffusion_pytorch_model"),
                ("vae", "diffusion_pytorch_model"),
            ]
            for variant in ("", ".fp16")
        ),
    ],
    "svd": [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "feature_extractor/preprocessor_config.json",
        *(
            f"{sub}/{stem}{variant}.safetensors"
            for sub, stem in [
                ("image_encoder", "model"),
                ("unet", "diffusion_pytorch_model"),
                ("vae", "diffusion_pytorch_model"),
            ]
            for variant in ("", ".fp16")
        ),
    ],
    "clip_model": ["open_clip_config.json", "open_clip_model.safetensors"],
    "hpsv2": ["HPS_v2.1_compressed.pt"],
    "pickscore": [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
    ],
    "imagereward": [
        "ImageReward.pt",
        "med_config.json",
        "vocab.txt",
        "tokenizer.json",
        "tokenizer_config.json",
    ],
    "vqascore": [
        "config.json",
        "generation_config.json",
        "pytorch_model.bin",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "clip-vit-large-patch14-336/config.json",
        "clip-vit-large-patch14-336/preprocessor_config.json",
    ],
}


@pytest.fixture(scope="module", autouse=True)
def offline() -> Iterator[None]:
    """Hub offline mode on and internet sockets refused: proves nothing is fetched."""
    import huggingface_hub.constants

    real_connect = socket.socket.connect

    def refuse_network(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"tiny model tests must not touch the network (tried {address})")
        real_connect(self, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        # huggingface_hub reads the variable once at import; set the constant it reads too.
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(socket.socket, "connect", refuse_network)
        yield


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory, offline: None) -> Path:
    """One root shared by the module; build_tiny_model's idempotence makes it a cache."""
    return tmp_path_factory.mktemp("tiny-models")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def _assert_noise_not_solid(images: list[Image.Image]) -> None:
    for image in images:
        assert _pixels(image).std() > 5.0, "tiny model produced a (near) solid image"


def test_names_and_folders_follow_the_registry() -> None:
    assert REAL_REPOS == {
        "flux_schnell": "black-forest-labs/FLUX.1-schnell",
        "sdxl_turbo": "stabilityai/sdxl-turbo",
        "svd": "stabilityai/stable-video-diffusion-img2vid-xt",
        "clip_model": "ViT-L-14",
        "hpsv2": "xswu/HPSv2",
        "pickscore": "yuvalkirstain/PickScore_v1",
        "imagereward": "THUDM/ImageReward",
        "vqascore": "zhiqiulin/clip-flant5-xl",
    }
    assert TINY_MODEL_DIRS == {
        "flux_schnell": "FLUX.1-schnell",
        "sdxl_turbo": "sdxl-turbo",
        "svd": "stable-video-diffusion-img2vid-xt",
        "clip_model": "ViT-L-14",
        "hpsv2": "HPSv2",
        "pickscore": "PickScore_v1",
        "imagereward": "ImageReward",
        "vqascore": "clip-flant5-xl",
    }
    assert sorted(TINY_MODELS) == sorted(REAL_REPOS)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_layout_matches_real_repo(tiny_root: Path, name: str) -> None:
    path = build_tiny_model(TINY_MODELS[name], tiny_root)

    assert path == tiny_root / TINY_MODEL_DIRS[name]
    for relative in EXPECTED_FILES[name]:
        assert (path / relative).is_file(), relative
    assert is_tiny_model(path)
    assert path.stat().st_mode & 0o777 == 0o755  # not mkdtemp's private 0700
    marker = json.loads((path / MARKER_NAME).read_text())
    assert marker["name"] == name
    assert marker["real_repo"] == REAL_REPOS[name]
    assert "random" in marker["warning"].lower()
    # Nothing half-built is left next to the model.
    assert [p.name for p in tiny_root.iterdir() if p.name.startswith(".")] == []


def test_flux_sharded_weights_are_indexed(tiny_root: Path) -> None:
    path = build_tiny_model(TINY_MODELS["flux_schnell"], tiny_root)
    for index_name in [
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "text_encoder_2/model.safetensors.index.json",
    ]:
        index = json.loads((path / index_name).read_text())
        shards = set(index["weight_map"].values())
        assert len(shards) > 1
        assert all((path / index_name).parent.joinpath(shard).is_file() for shard in shards)


def test_flux_schnell_generates(tiny_root: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    path = build_tiny_model(TINY_MODELS["flux_schnell"], tiny_root)
    pipe = FluxPipeline.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == 1.0
    assert not pipe.scheduler.config.use_dynamic_shifting

    prompt = "a cinematic photo of a red cat on a street, highly detailed"
    images = pipe(
        prompt=[prompt, prompt],
        num_inference_steps=2,
        guidance_scale=0.0,
        width=64,
        height=64,
        max_sequence_length=256,  # what the real backend uses
        generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
    ).images
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    _assert_noise_not_solid(images)
    assert not np.array_equal(_pixels(images[0]), _pixels(images[1]))

    (large,) = pipe(
        prompt="word " * 400,  # longer than both tokenizers' limits: must truncate, not fail
        num_inference_steps=2,
        guidance_scale=0.0,
        width=128,
        height=128,
        max_sequence_length=256,
        generator=torch.Generator().manual_seed(3),
    ).images
    assert large.size == (128, 128)


def test_sdxl_turbo_generates_from_fp16_variant(tiny_root: Path) -> None:
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline
    from safetensors import safe_open

    path = build_tiny_model(TINY_MODELS["sdxl_turbo"], tiny_root)
    with safe_open(path / "unet" / "diffusion_pytorch_model.fp16.safetensors", "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16

    pipe = StableDiffusionXLPipeline.from_pretrained(
        path, variant="fp16", dtype=torch.float32, local_files_only=True
    )
    assert isinstance(pipe.scheduler, EulerAncestralDiscreteScheduler)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.unet.dtype == torch.float32

    images = pipe(
        prompt=["a photo of a dog", "a photo of a dog"],
        num_inference_steps=1,
        guidance_scale=0.0,
        width=64,
        height=64,
        generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
    ).images
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    _assert_noise_not_solid(images)
    assert not np.array_equal(_pixels(images[0]), _pixels(images[1]))


def test_sdxl_turbo_loads_without_variant(tiny_root: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    path = build_tiny_model(TINY_MODELS["sdxl_turbo"], tiny_root)
    pipe = StableDiffusionXLPipeline.from_pretrained(
        path, dtype=torch.float32, local_files_only=True
    )
    assert pipe.text_encoder_2.dtype == torch.float32


def test_svd_xt_generates_frames(tiny_root: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline

    path = build_tiny_model(TINY_MODELS["svd"], tiny_root)
    pipe = StableVideoDiffusionPipeline.from_pretrained(
        path, variant="fp16", dtype=torch.float32, local_files_only=True
    )
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert pipe.scheduler.config.use_karras_sigmas
    assert pipe.unet.config.num_frames == 25  # the real default, used when num_frames is None

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    frames = pipe(
        image,
        height=64,
        width=64,
        num_frames=4,
        num_inference_steps=2,
        decode_chunk_size=2,
        generator=torch.Generator().manual_seed(0),
    ).frames[0]
    assert len(frames) == 4
    assert all(frame.size == (64, 64) for frame in frames)
    _assert_noise_not_solid(frames)


def test_open_clip_loads_and_embeds(tiny_root: Path) -> None:
    import open_clip
    from safetensors.torch import load_file

    path = build_tiny_model(TINY_MODELS["clip_model"], tiny_root)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    model.eval()

    # The checkpoint was really loaded (not a fresh random init).
    saved = load_file(path / "open_clip_model.safetensors")
    assert torch.equal(model.state_dict()["visual.proj"], saved["visual.proj"])

    tokens = tokenizer(["a photo of a cat", "word " * 200])
    assert tokens.shape == (2, 77)
    image = Image.new("RGB", (96, 80), (200, 30, 30))
    pixels = preprocess(image).unsqueeze(0)
    assert pixels.shape == (1, 3, 224, 224)
    with torch.no_grad():
        image_features = model.encode_image(pixels)
        text_features = model.encode_text(tokens)
    assert image_features.shape[1] == text_features.shape[1]
    assert text_features.shape[0] == 2


def test_clip_tokenizer_handles_any_prompt(tiny_root: Path) -> None:
    from transformers import CLIPTokenizer

    path = build_tiny_model(TINY_MODELS["sdxl_turbo"], tiny_root)
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    assert tokenizer.model_max_length == 77
    ids = tokenizer("Ünïcödé café 🐱, a PHOTO of 42 cats!").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id
    # Byte-level: every character is representable, so no unknown (== end-of-text) inside.
    assert tokenizer.eos_token_id not in ids[1:-1]
    long = tokenizer("word " * 500, truncation=True, max_length=tokenizer.model_max_length)
    assert len(long.input_ids) == 77

    tokenizer_2 = CLIPTokenizer.from_pretrained(path / "tokenizer_2", local_files_only=True)
    assert tokenizer_2.pad_token == "!"


def test_t5_tokenizer_accepts_256_tokens(tiny_root: Path) -> None:
    from transformers import T5TokenizerFast

    path = build_tiny_model(TINY_MODELS["flux_schnell"], tiny_root)
    tokenizer = T5TokenizerFast.from_pretrained(path / "tokenizer_2", local_files_only=True)
    assert tokenizer.model_max_length == 512
    encoded = tokenizer(
        "A photo of a cat, " * 100, padding="max_length", max_length=256, truncation=True
    )
    assert len(encoded.input_ids) == 256
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1


def test_network_is_really_refused() -> None:
    with pytest.raises(OSError, match="must not touch the network"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)


def test_build_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = build_tiny_model(TINY_MODELS["svd"], tmp_path)
    marker_mtime = (path / MARKER_NAME).stat().st_mtime_ns

    def must_not_rebuild(dest: Path) -> None:
        raise AssertionError("a complete build was rebuilt")

    guarded = dataclasses.replace(TINY_MODELS["svd"], tiny_builder=must_not_rebuild)
    start = time.perf_counter()
    again = build_tiny_model(guarded, tmp_path)
    assert time.perf_counter() - start < 0.5
    assert again == path
    assert (path / MARKER_NAME).stat().st_mtime_ns == marker_mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == [TINY_MODEL_DIRS["svd"]]


def test_concurrent_builder_that_loses_the_race_keeps_the_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = TINY_MODELS["clip_model"]
    raced = []

    def racing_builder(dest: Path) -> None:
        # While "we" build, another builder finishes and renames its copy into place.
        raced.append(build_tiny_model(real, tmp_path))
        real.tiny_builder(dest)

    path = build_tiny_model(dataclasses.replace(real, tiny_builder=racing_builder), tmp_path)

    assert raced == [path]
    assert is_tiny_model(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_stale_build_is_replaced(tmp_path: Path) -> None:
    path = build_tiny_model(TINY_MODELS["clip_model"], tmp_path)
    marker = json.loads((path / MARKER_NAME).read_text())
    (path / MARKER_NAME).write_text(json.dumps(marker | {"format_version": -1}))
    (path / "leftover.txt").write_text("from an older builder")

    assert build_tiny_model(TINY_MODELS["clip_model"], tmp_path) == path
    assert not (path / "leftover.txt").exists()
    assert json.loads((path / MARKER_NAME).read_text())["format_version"] == (
        tiny_models.FORMAT_VERSION
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_unreadable_marker_is_rebuilt(tmp_path: Path) -> None:
    path = build_tiny_model(TINY_MODELS["clip_model"], tmp_path)
    (path / MARKER_NAME).write_text("not json")

    assert build_tiny_model(TINY_MODELS["clip_model"], tmp_path) == path
    assert json.loads((path / MARKER_NAME).read_text())["name"] == "clip_model"


def test_refuses_to_overwrite_a_real_model(tmp_path: Path) -> None:
    real = tmp_path / TINY_MODEL_DIRS["flux_schnell"]
    real.mkdir()
    (real / "model_index.json").write_text("{}")

    assert not is_tiny_model(real)
    with pytest.raises(FileExistsError):
        build_tiny_model(TINY_MODELS["flux_schnell"], tmp_path)
    assert (real / "model_index.json").read_text() == "{}"


def test_unknown_name_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        build_tiny_model(TINY_MODELS["flux_dev"], tmp_path)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_builds_are_deterministic(tmp_path: Path, name: str) -> None:
    def digest(path: Path) -> dict[str, bytes]:
        return {str(f.relative_to(path)): f.read_bytes() for f in path.rglob("*") if f.is_file()}

    first = build_tiny_model(TINY_MODELS[name], tmp_path / "a")
    second = build_tiny_model(TINY_MODELS[name], tmp_path / "b")
    assert digest(first) == digest(second)


def test_build_leaves_callers_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(TINY_MODELS["clip_model"], tmp_path)
    assert torch.equal(torch.rand(3), expected)
