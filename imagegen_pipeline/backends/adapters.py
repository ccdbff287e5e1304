"""LoRA adapters on a loaded diffusers pipeline: load each once, switch between them, free them.

A step's work is ordered by adapter set, so the base model stays loaded and only the adapters
change between groups: ``load_lora_weights(..., adapter_name=...)`` the first time an adapter
is needed, ``set_adapters`` to switch (a switch costs milliseconds; reloading FLUX costs tens of
seconds), ``delete_adapters`` once no later group needs it, so the warm base model is left as
it was loaded.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from imagegen_pipeline.lora import LoraAdapter


@dataclass
class AdapterSwitcher:
    """The adapters of one pipeline: what is loaded, what is active, and what it cost."""

    pipeline: Any
    loaded: dict[str, LoraAdapter] = field(default_factory=dict)  # by adapter name
    active: tuple[tuple[str, float], ...] = ()  # (adapter name, scale) in use now
    loads: int = 0  # adapter files loaded
    switches: int = 0  # changes of the active set
    load_seconds: float = 0.0  # reading adapter files into the pipeline (once per file)
    switch_seconds: float = 0.0  # changing the active set between loaded adapters

    def activate(self, loras: Sequence[LoraAdapter]) -> None:
        """Make ``loras`` (at their scales) the active adapters; none: the base model."""
        wanted = tuple((adapter.adapter_name, adapter.scale) for adapter in loras)
        if wanted == self.active:
            return
        for adapter in loras:
            if adapter.adapter_name not in self.loaded:
                self._load(adapter)
        started = time.perf_counter()
        if loras:
            self.pipeline.enable_lora()
            self.pipeline.set_adapters(
                [name for name, _ in wanted], adapter_weights=[scale for _, scale in wanted]
            )
        elif self.loaded:
            self.pipeline.disable_lora()
        self.active = wanted
        self.switches += 1
        self.switch_seconds += time.perf_counter() - started

    def reset_counts(self) -> None:
        """Start counting loads, switches and their seconds afresh."""
        self.loads = self.switches = 0
        self.load_seconds = self.switch_seconds = 0.0

    def _load(self, adapter: LoraAdapter) -> None:
        from diffusers.utils import logging as diffusers_logging

        started = time.perf_counter()
        level = diffusers_logging.get_verbosity()
        # A UNet-only LoRA makes diffusers warn, per text encoder, that it found no keys for it.
        diffusers_logging.set_verbosity_error()
        try:
            self.pipeline.load_lora_weights(
                str(adapter.path.parent),
                weight_name=adapter.path.name,
                adapter_name=adapter.adapter_name,
            )
        finally:
            diffusers_logging.set_verbosity(level)
        self.loaded[adapter.adapter_name] = adapter
        self.loads += 1
        self.load_seconds += time.perf_counter() - started

    def release(self, still_needed: Iterable[str] = ()) -> None:
        """Delete the loaded adapters that no later group needs."""
        keep = set(still_needed)
        done = [name for name in self.loaded if name not in keep]
        if done:
            self.pipeline.delete_adapters(done)
            for name in done:
                del self.loaded[name]
            self.active = tuple(item for item in self.active if item[0] in keep)
