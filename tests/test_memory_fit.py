"""Memory fitting: real-size configs on the meta device, choices derived by hand below.

Hand derivation (GiB = 2**30 bytes; reserve = max(0.5 GiB, 5% of free); usable = free - reserve)

FLUX.1-schnell, bfloat16 (2 bytes), 1024x1024, max_sequence_length 256
  weights = published parameter counts x 2:
    transformer     11,891,178,560 x 2 = 23,782,357,120 B = 22.149 GiB
    text_encoder_2   4,762,310,656 x 2 =  9,524,621,312 B =  8.871 GiB  (T5-XXL encoder)
    text_encoder       123,060,480 x 2 =    246,120,960 B =  0.229 GiB  (CLIP-L text)
    vae                 83,819,683 x 2 =    167,639,366 B =  0.156 GiB
    whole pipeline                        33,720,738,758 B = 31.405 GiB
  activations per image:
    transformer: (64*64 image tokens + 256 text tokens) x 3072 hidden x 20 live widths x 2
                 = 4352 x 3072 x 40 = 534,773,760 B = 0.498 GiB
    vae decode:  (1024*1024 px x 256 ch x 4 live tensors + 2 x (128*128)^2 attention) x 2
                 = (1,073,741,824 + 536,870,912) x 2 = 3,221,225,472 B = 3.000 GiB
    T5 (256 tokens): 256 x (6*4096 + 3*10240 + 25*4096) x 2 + 2 x 64 heads x 256^2 x 4
                 = 80,740,352 + 33,554,432 = 114,294,784 B = 0.106 GiB
    CLIP (77 tokens): 77 x (6*768 + 2*3072 + 13*768) x 2 + 2 x 12 x 77^2 x 4
                 = 3,193,344 + 569,184 = 3,762,528 B = 0.004 GiB
    sum (no VAE slicing) = 3,874,056,544 B = 3.608 GiB per image
  largest single module (what sequential offload holds), x 2 bytes:
    transformer norm1_context.linear 3072 x 18432 + 18432 = 56,641,536 -> 0.105 GiB
    T5 shared embedding 32128 x 4096 -> 0.245 GiB; VAE 3x3 conv 512->512 -> 0.004 GiB
  80 GiB: reserve 4.0, usable 76.0. Whole 31.405 + b x 3.608 <= 76 -> b <= 12.4: no offload,
          batch 8 (the cap).
  24 GiB: reserve 1.2, usable 22.8. Whole + 1 image = 35.0 > 22.8. Transformer 22.149 + 0.498
          = 22.647 <= 22.8 (0.15 GiB to spare): model offload. Batch: 22.149 + 0.498 b <= 22.8
          -> b <= 1.3 -> 1 (T5 8.98 and VAE 0.156 + 3.0 b allow more).
  23.5 GiB (a 24 GB card with its CUDA context in use): reserve 1.175, usable 22.325 < 22.647
          -> sequential. Batch limited by the VAE: 0.004 + 3.0 b <= 22.325 -> b = 7.
  16 GiB: reserve 0.8, usable 15.2 < 22.647 -> sequential. VAE: 0.004 + 3.0 b <= 15.2 -> 5
          (transformer: 0.105 + 0.498 b would allow 30).
   8 GiB: reserve 0.5 (5% is 0.4), usable 7.5 -> sequential. VAE: 0.004 + 3.0 b <= 7.5 -> 2.

SDXL-Turbo, float16 (2 bytes; the VAE has force_upcast and SDXL decodes it in float32: 4), 512x512
  weights:
    unet            2,567,463,684 x 2 = 5,134,927,368 B = 4.782 GiB
    text_encoder_2    694,659,840 x 2 = 1,389,319,680 B = 1.294 GiB  (OpenCLIP bigG + projection)
    text_encoder      123,060,480 x 2 =   246,120,960 B = 0.229 GiB
    vae                83,653,863 x 4 =   334,615,452 B = 0.312 GiB
    whole pipeline                      7,104,983,460 B = 6.617 GiB
  activations per image:
    unet: latent 64x64, levels of 4096/1024/256 tokens at 320/640/1280 channels.
      widest moment: level 0 ResNet on concat 640+320: 4096 x (3*960 + 320) = 13,107,200;
      level 1 transformer: 1024 x 640 x 20 = 13,107,200 (the same); others smaller.
      skips: 4096*320 (conv_in) + 2*320*4096 + 320*1024 + 2*640*1024 + 640*256 + 2*1280*256
             = 6,389,760
      (13,107,200 + 6,389,760) x 2 = 38,993,920 B = 0.036 GiB
    vae decode (float32): (512*512 x 256 x 4 + 2 x (64*64)^2) x 4 = 1,207,959,552 B = 1.125 GiB
    bigG (77 tokens): 77 x (6*1280 + 2*5120 + 33*1280) x 2 + 2 x 20 x 77^2 x 4 = 10,213,280 B
    CLIP-L: 3,762,528 B (as above)
    sum = 1,260,929,280 B = 1.174 GiB per image
  80 GiB and 24 GiB: whole 6.617 + 8 x 1.174 = 16.0 <= 22.8 -> no offload, batch 8 (the cap).
  16 GiB: usable 15.2: 6.617 + b x 1.174 <= 15.2 -> b <= 7.3 -> no offload, batch 7.
   8 GiB: usable 7.5: 6.617 + 1.174 = 7.79 > 7.5 -> not whole. UNet 4.782 + 0.036 fits ->
          model offload. Batch limited by the VAE: 0.312 + 1.125 b <= 7.5 -> b <= 6.4 -> 6.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from imagegen_pipeline import component_sizes
from imagegen_pipeline.component_sizes import component_weight_bytes
from imagegen_pipeline.memory_fit import MemoryPlan, free_memory_bytes, plan_memory
from imagegen_pipeline.registry import MODELS

GIB = 1024**3
CONFIGS = Path(__file__).parent / "data" / "real_model_configs"
FLUX = CONFIGS / "FLUX.1-schnell"
SDXL = CONFIGS / "sdxl-turbo"
# Each backend names its components' activation estimates in its spec.
FLUX_HOOKS = MODELS["flux_schnell"].memory
SDXL_HOOKS = MODELS["sdxl_turbo"].memory


def flux_plan(free_gib: float, **kwargs: object) -> MemoryPlan:
    """FLUX.1-schnell as the project runs it: bf16, 1024 px, 256 T5 tokens."""
    options: dict = {"dtype": "bfloat16", "width": 1024, "height": 1024, "text_tokens": 256}
    return plan_memory(FLUX, FLUX_HOOKS, free_bytes=int(free_gib * GIB), **(options | kwargs))


def sdxl_plan(free_gib: float, **kwargs: object) -> MemoryPlan:
    """SDXL-Turbo as the project runs it: fp16, 512 px."""
    options: dict = {"dtype": "float16", "width": 512, "height": 512}
    return plan_memory(SDXL, SDXL_HOOKS, free_bytes=int(free_gib * GIB), **(options | kwargs))


# --- the fixtures are the real models --------------------------------------------------------


@pytest.mark.parametrize(
    ("folder", "component", "published"),
    [
        (FLUX, "transformer", 11.9e9),  # FLUX.1 is "12B"; schnell has no guidance embedder
        (FLUX, "text_encoder_2", 4.76e9),  # T5-XXL encoder (google/t5-v1_1-xxl)
        (FLUX, "text_encoder", 123e6),  # CLIP ViT-L/14 text tower
        (FLUX, "vae", 84e6),  # the 16-channel FLUX VAE
        (SDXL, "unet", 2.567e9),
        (SDXL, "text_encoder", 123e6),
        (SDXL, "text_encoder_2", 694e6),  # OpenCLIP ViT-bigG text tower with projection
        (SDXL, "vae", 84e6),
    ],
)
def test_real_configs_have_the_published_parameter_counts(
    folder: Path, component: str, published: float
) -> None:
    parameters = component_weight_bytes(folder, "float32")[component] / 4
    assert parameters == pytest.approx(published, rel=0.02)


def test_components_are_the_weight_bearing_ones() -> None:
    # Scheduler and tokenizers have no weights; SDXL's absent IP-adapter parts are [null, null].
    assert set(component_weight_bytes(FLUX, "bfloat16")) == {
        "transformer",
        "text_encoder",
        "text_encoder_2",
        "vae",
    }
    assert set(component_weight_bytes(SDXL, "float16")) == {
        "unet",
        "text_encoder",
        "text_encoder_2",
        "vae",
    }


def test_bytes_follow_the_dtype_each_component_runs_in() -> None:
    fp32 = component_weight_bytes(FLUX, "float32")
    bf16 = component_weight_bytes(FLUX, "bfloat16")
    assert bf16 == {name: size // 2 for name, size in fp32.items()}
    # float16 keeps T5's feed-forward output projections ("wo", 24 x 4096 x 10240) in
    # float32, as transformers does: 4,762,310,656 x 2 + 1,006,632,960 x 2 extra bytes.
    assert component_weight_bytes(FLUX, "float16")["text_encoder_2"] == 11_537_887_232
    # SDXL decodes its force_upcast VAE in float32 even when the pipeline runs in fp16.
    sdxl_fp16 = component_weight_bytes(SDXL, "float16", upcast_vae=True)
    sdxl_fp32 = component_weight_bytes(SDXL, "float32")
    assert sdxl_fp16["vae"] == sdxl_fp32["vae"] == 83_653_863 * 4
    assert sdxl_fp16["unet"] == sdxl_fp32["unet"] // 2
    # ...while FluxPipeline ignores force_upcast: its VAE stays in the pipeline's dtype.
    assert component_weight_bytes(FLUX, "float16")["vae"] == 83_819_683 * 2


def test_activation_estimates_match_the_documented_formulas() -> None:
    # The module docstring's arithmetic, term by term.
    flux = flux_plan(80)
    assert flux.activation_bytes == {
        "transformer": (64 * 64 + 256) * 3072 * 20 * 2,
        "vae": (1024 * 1024 * 256 * 4 + 2 * (128 * 128) ** 2) * 2,
        "text_encoder_2": 256 * (6 * 4096 + 3 * 10240 + 25 * 4096) * 2 + 2 * 64 * 256**2 * 4,
        "text_encoder": 77 * (6 * 768 + 2 * 3072 + 13 * 768) * 2 + 2 * 12 * 77**2 * 4,
    }
    assert flux.activation_bytes_per_image == 3_874_056_544
    sdxl = sdxl_plan(80)
    assert sdxl.activation_bytes["unet"] == (13_107_200 + 6_389_760) * 2
    assert sdxl.activation_bytes["vae"] == (512 * 512 * 256 * 4 + 2 * (64 * 64) ** 2) * 4
    assert sdxl.activation_bytes["text_encoder_2"] == 10_213_280
    assert sdxl.activation_bytes_per_image == 1_260_929_280


# --- the choices ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("free_gib", "offload", "batch"),
    [
        (80, "none", 8),  # 31.4 + 8 x 3.6 = 60.3 of 76.0 usable; the cap stops it at 8
        (24, "model", 1),  # transformer 22.15 + 0.50 = 22.65 of 22.8 usable
        (23.5, "sequential", 7),  # 22.65 > 22.33 usable; VAE 3.0 per image: 7 x 3.0 <= 22.3
        (16, "sequential", 5),  # VAE: 5 x 3.0 <= 15.2
        (8, "sequential", 2),  # VAE: 2 x 3.0 <= 7.5
    ],
)
def test_flux_schnell_choices(free_gib: float, offload: str, batch: int) -> None:
    plan = flux_plan(free_gib)
    assert (plan.offload, plan.batch_size) == (offload, batch), plan.reason
    assert plan.fits
    assert plan.peak_bytes <= plan.free_bytes - plan.reserve_bytes


@pytest.mark.parametrize(
    ("free_gib", "offload", "batch"),
    [
        (80, "none", 8),  # 6.6 + 8 x 1.17 = 16.0 of 76.0 usable; capped
        (24, "none", 8),  # 16.0 of 22.8 usable; capped
        (16, "none", 7),  # 6.6 + 7 x 1.17 = 14.8 <= 15.2 < 6.6 + 8 x 1.17
        (8, "model", 6),  # whole + 1 image 7.79 > 7.5; VAE 0.31 + 6 x 1.125 = 7.06 <= 7.5
    ],
)
def test_sdxl_turbo_choices(free_gib: float, offload: str, batch: int) -> None:
    plan = sdxl_plan(free_gib)
    assert (plan.offload, plan.batch_size) == (offload, batch), plan.reason
    assert plan.fits


def test_flux_24_gib_peak_and_reason() -> None:
    plan = flux_plan(24)
    # Model offload: the transformer's weights plus one image's activations.
    assert plan.peak_bytes == 23_782_357_120 + 534_773_760
    assert plan.reserve_bytes == int(24 * GIB * 0.05)
    assert plan.weights_bytes["transformer"] == 11_891_178_560 * 2
    assert "model offload" in plan.reason
    assert "transformer" in plan.reason
    assert "31.4 GiB" in plan.reason  # the whole pipeline, bf16


def test_reserve_is_half_a_gib_on_small_devices() -> None:
    assert flux_plan(8).reserve_bytes == GIB // 2  # 5% of 8 GiB is only 0.4 GiB
    assert flux_plan(80).reserve_bytes == 4 * GIB


def test_explicit_offload_is_kept_and_the_batch_chosen() -> None:
    # Sequential at 80 GiB: only the VAE limits: 0.004 + 3.0 b <= 76 -> b = 25.
    plan = flux_plan(80, offload="sequential", max_batch_size=64)
    assert (plan.offload, plan.batch_size) == ("sequential", 25)
    # Model offload on SDXL at 8 GiB, as auto would pick: the VAE allows 6 (see docstring).
    plan = sdxl_plan(8, offload="model", max_batch_size=16)
    assert (plan.offload, plan.batch_size) == ("model", 6)
    # No offload forced where it cannot fit (31.4 GiB > 22.8): kept, batch 1, said so.
    plan = flux_plan(24, offload="none")
    assert (plan.offload, plan.batch_size, plan.fits) == ("none", 1, False)
    assert "out-of-memory" in plan.reason


def test_explicit_batch_is_kept_and_the_offload_chosen() -> None:
    # Batch 16 at 80 GiB: whole 31.4 + 16 x 3.6 = 89.1 > 76; transformer 22.15 + 16 x 0.5
    # = 30.1 and VAE 0.16 + 16 x 3.0 = 48.2 fit -> model offload. Kept above max_batch_size.
    plan = flux_plan(80, batch_size=16)
    assert (plan.offload, plan.batch_size, plan.fits) == ("model", 16, True)
    # SDXL at 8 GiB with batch 1: whole 6.6 + 1.17 = 7.79 > 7.5 -> model.
    assert sdxl_plan(8, batch_size=1).offload == "model"
    # SDXL at 24 GiB with batch 12: 6.6 + 12 x 1.17 = 20.7 <= 22.8 -> no offload.
    assert sdxl_plan(24, batch_size=12).offload == "none"
    # FLUX at 8 GiB with batch 3: the VAE alone needs 9 GiB -> sequential, said not to fit.
    plan = flux_plan(8, batch_size=3)
    assert (plan.offload, plan.batch_size, plan.fits) == ("sequential", 3, False)
    assert "out-of-memory" in plan.reason


def test_both_explicit_are_kept() -> None:
    plan = sdxl_plan(8, offload="none", batch_size=2)
    assert (plan.offload, plan.batch_size, plan.fits) == ("none", 2, False)  # 6.6 + 2.35 > 7.5


def test_vae_slicing_raises_the_batch_that_fits() -> None:
    # Without slicing, FLUX at 16 GiB is limited by the VAE (5 x 3.0 GiB). With it, the VAE
    # decodes one image (3.0 GiB, fixed) and the transformer limits: 0.105 + 0.498 b <= 15.2
    # -> b = 30.
    assert flux_plan(16, max_batch_size=64).batch_size == 5
    sliced = flux_plan(16, max_batch_size=64, vae_slicing=True)
    assert (sliced.offload, sliced.batch_size) == ("sequential", 30)
    assert sliced.activation_bytes_per_image == 3_874_056_544 - 3_221_225_472
    # SDXL at 16 GiB: 7 without, the cap of 8 with (6.6 + 1.125 + 8 x 0.05 = 8.1 GiB).
    assert sdxl_plan(16).batch_size == 7
    assert sdxl_plan(16, vae_slicing=True).batch_size == 8


def test_batch_never_below_one_when_nothing_fits() -> None:
    # 2 GiB: usable 1.5 GiB, and one FLUX VAE decode alone needs 3 GiB.
    plan = flux_plan(2)
    assert (plan.offload, plan.batch_size, plan.fits) == ("sequential", 1, False)
    assert "batch 1" in plan.reason
    assert "out-of-memory" in plan.reason
    # No free memory at all: the same, not a zero or negative batch.
    plan = flux_plan(0)
    assert (plan.offload, plan.batch_size) == ("sequential", 1)


def test_max_batch_size_caps_the_automatic_batch() -> None:
    # 80 GiB would take 12 FLUX images without the cap: (76 - 31.4) / 3.6 = 12.4.
    assert flux_plan(80, max_batch_size=64).batch_size == 12
    assert flux_plan(80, max_batch_size=3).batch_size == 3


def test_as_metadata_is_flat_and_json_serialisable() -> None:
    metadata = flux_plan(24).as_metadata()
    assert json.loads(json.dumps(metadata)) == metadata
    assert all(isinstance(value, str | int | float | bool) for value in metadata.values())
    assert metadata["memory_offload"] == "model"
    assert metadata["memory_batch_size"] == 1
    assert metadata["memory_weights_bytes_transformer"] == 23_782_357_120
    assert metadata["memory_activation_bytes_vae"] == 3_221_225_472
    assert metadata["memory_reason"] == flux_plan(24).reason


def test_folder_without_model_index_names_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-pipeline"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder))):
        component_weight_bytes(folder, "float16")
    with pytest.raises(FileNotFoundError, match=r"model_index\.json"):
        plan_memory(folder, SDXL_HOOKS, dtype="float16", free_bytes=8 * GIB, width=512, height=512)


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="dtype"):
        component_weight_bytes(FLUX, "auto")
    with pytest.raises(ValueError, match="offload"):
        flux_plan(24, offload="cpu")
    with pytest.raises(ValueError, match="max_batch_size"):
        flux_plan(24, max_batch_size=0)


def test_weights_are_cached_per_folder_and_dtype() -> None:
    component_weight_bytes(FLUX, "bfloat16")
    hits = component_sizes._component_sizes.cache_info().hits
    started = time.perf_counter()
    component_weight_bytes(str(FLUX) + "/", "bfloat16")  # the same folder, spelled differently
    assert time.perf_counter() - started < 0.05
    assert component_sizes._component_sizes.cache_info().hits == hits + 1


# --- against a real loaded pipeline ----------------------------------------------------------


def test_tiny_flux_weights_match_the_loaded_pipeline(tmp_path: Path) -> None:
    from diffusers import FluxPipeline

    from imagegen_pipeline.tiny_models import build_tiny_model

    path = build_tiny_model(MODELS["flux_schnell"], tmp_path)
    pipeline = FluxPipeline.from_pretrained(path)
    loaded = {
        name: sum(p.numel() * 4 for p in component.parameters())
        for name, component in pipeline.components.items()
        if isinstance(component, torch.nn.Module)
    }
    assert component_weight_bytes(path, "float32") == loaded


def test_tiny_flux_float16_matches_what_the_loader_keeps_in_float32(tmp_path: Path) -> None:
    from diffusers import FluxPipeline

    from imagegen_pipeline.tiny_models import build_tiny_model

    path = build_tiny_model(MODELS["flux_schnell"], tmp_path)
    pipeline = FluxPipeline.from_pretrained(path, dtype=torch.float16)
    loaded = {
        name: sum(p.numel() * p.element_size() for p in component.parameters())
        for name, component in pipeline.components.items()
        if isinstance(component, torch.nn.Module)
    }
    # The loader really keeps T5's "wo" in float32, so T5 is more than half its fp32 size.
    assert loaded["text_encoder_2"] > component_weight_bytes(path, "float32")["text_encoder_2"] / 2
    assert component_weight_bytes(path, "float16") == loaded


# --- free memory -----------------------------------------------------------------------------


def test_free_memory_bytes_cpu_reads_available_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    class FakeMemory:
        available = 12_345 * GIB // 1000

    monkeypatch.setattr(psutil, "virtual_memory", lambda: FakeMemory())
    assert free_memory_bytes("cpu") == FakeMemory.available
    assert free_memory_bytes("mps") == FakeMemory.available


def test_free_memory_bytes_cuda_reads_the_named_device(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []

    def fake_mem_get_info(device: object = None) -> tuple[int, int]:
        calls.append(device)
        return (7 * GIB, 24 * GIB)

    monkeypatch.setattr(torch.cuda, "mem_get_info", fake_mem_get_info)
    assert free_memory_bytes("cuda:1") == 7 * GIB
    assert free_memory_bytes("cuda") == 7 * GIB
    assert calls == [1, None]


def test_lora_adapters_count_with_the_component_they_adapt() -> None:
    # FLUX at 24 GiB had 0.15 GiB to spare under model offload (see the top): a 200 MiB LoRA
    # on the transformer (about a rank-64 FLUX LoRA in bf16) no longer fits that way.
    lora = {"transformer": 200 * 2**20}
    plan = flux_plan(24, adapter_bytes=lora)
    assert plan.weights_bytes["transformer"] == 23_782_357_120 + 200 * 2**20
    assert (plan.offload, flux_plan(24).offload) == ("sequential", "model")
    assert "LoRA adapters and ControlNets 0.20 GiB included" in plan.reason
    # SDXL-Turbo at 16 GiB: batch 7 left 0.37 GiB; a 0.5 GiB UNet LoRA takes one image off.
    assert sdxl_plan(16, adapter_bytes={"unet": GIB // 2}).batch_size == 6
    assert sdxl_plan(16, adapter_bytes={}).batch_size == 7
