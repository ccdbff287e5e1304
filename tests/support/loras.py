"""Tiny LoRA adapters the way trainers make them: PEFT on the real component, saved with the
pipeline's own ``save_lora_weights`` (the layout users download). For tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
# Per backend: the component a LoRA adapts, its diffusers class, the pipeline that saves it and
# the keyword its layers go under.
COMPONENTS = {
    "flux_schnell": ("transformer", "FluxTransformer2DModel", "FluxPipeline"),
    "sdxl_turbo": ("unet", "UNet2DConditionModel", "StableDiffusionXLPipeline"),
}


def lora_layers(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA on ``model``'s attention, random A and B (PEFT's test init) so it acts."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    model.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=ATTENTION),
        adapter_name=f"train{seed}",
    )
    state = get_peft_model_state_dict(model, adapter_name=f"train{seed}")
    # Big enough to move a tiny random model's pixels visibly.
    return {k: v * 8 for k, v in convert_state_dict_to_diffusers(state).items()}


def make_lora(backend: str, model_dir: Path, folder: Path, seed: int) -> Path:
    """A LoRA for ``backend``'s tiny model in ``model_dir``, saved into ``folder``; returns its
    weight file."""
    import diffusers

    component, model_class, pipeline_class = COMPONENTS[backend]
    model = getattr(diffusers, model_class).from_pretrained(model_dir / component)
    save = getattr(diffusers, pipeline_class).save_lora_weights
    save(folder, **{f"{component}_lora_layers": lora_layers(model, seed)})
    return folder / "pytorch_lora_weights.safetensors"
