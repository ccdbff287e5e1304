"""LoRA adapters on a loaded diffusers pipeline: load each once, switch between them, free them.

A step's work is ordered by adapter set, so the base model stays loaded and only the adapters
change between groups: ``load_lora_weights(..., adapter_name=...)`` the first time an adapter
is needed, ``set_adapters`` to switch (a switch costs milliseconds; reloading FLUX costs tens of
seconds), ``delete_adapters`` at the first call that does not use it, so the warm base model
carries only the adapters of its latest call (which the step's next call likely uses again).

Under compile (``backends/compilation.py``) switching by name would recompile the denoiser:
``set_adapters`` and ``delete_adapters`` change the modules and the Python floats the compiled
graph was specialised on. So a compiled pipeline switches by **hotswap** instead: before its
first adapter, ``enable_lora_hotswap(target_rank=...)``; then a fixed set of adapter slots
(``slot0``, ``slot1``, ... as many as the most adapters one image uses), loaded once and padded
to one rank, whose weights ``load_lora_weights(..., adapter_name=slot, hotswap=True)`` replaces
in place; scales are written into the slots' scaling tensors in place, and an unused slot (or
the base image) is a slot at scale 0. The modules never change, so the compiled graph holds.
Slots are loaded before the first compiled call (``prepare``), so the first trace holds them;
they stay loaded with the warm model (deleting them would change the modules again). Limits,
PEFT's: a hotswapped LoRA may adapt only layers its slot's first adapter adapts, no text
encoder, and a rank up to the slots' (``hotswap_rank``, or the first step's highest rank).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from imagegen_pipeline.lora import LoraAdapter, lora_elements, lora_rank

SLOT = "slot{}"  # hotswap slot names: slot0, slot1, ...


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
    hotswap: bool = False  # switch by hotswapping into fixed slots (a compiled denoiser)
    hotswap_rank: int | None = None  # the slots' rank; None: the first step's highest
    slots: list[LoraAdapter] = field(default_factory=list)  # what each slot holds now
    _base_scaling: dict[int, list[tuple[Any, Any]]] = field(default_factory=dict)

    def prepare(self, adapter_sets: Iterable[Sequence[LoraAdapter]]) -> None:
        """Under hotswap, load the slots the coming ``adapter_sets`` need before the first
        compiled call, so the compiled graph holds them from the start."""
        if not self.hotswap:
            return
        sets = [tuple(loras) for loras in adapter_sets if loras]
        if not sets:
            return
        for loras in sets:
            for adapter in loras:
                if "text_encoder" in adapter.targets or "text_encoder_2" in adapter.targets:
                    raise ValueError(
                        f"LoRA {adapter.source!r} adapts a text encoder, which cannot be "
                        "hotswapped (diffusers): set compile 'off' for this set"
                    )
        rank = max(lora_rank(a.path) for loras in sets for a in loras)
        if self.slots and rank > self.hotswap_rank:
            raise ValueError(
                f"a LoRA of rank {rank} cannot be hotswapped into slots of rank "
                f"{self.hotswap_rank}: set hotswap_rank to {rank} or more"
            )
        needed = max(len(loras) for loras in sets)
        if needed <= len(self.slots):
            return
        if not self.slots:
            # Before the first adapter: pads every later one to the slots' rank and keeps
            # scales as tensors, so neither a new rank nor a new scale changes the graph.
            self.hotswap_rank = max(self.hotswap_rank or 0, rank)
            self.pipeline.enable_lora_hotswap(
                target_rank=self.hotswap_rank, check_compiled="ignore"
            )
        # Each new slot starts with the adapter of that position that adapts the most.
        for position in range(len(self.slots), needed):
            candidates = [loras[position] for loras in sets if len(loras) > position]
            first = max(candidates, key=lambda a: sum(lora_elements(a.path).values()))
            self._load(first, SLOT.format(position))
            self.slots.append(first)
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        # Every slot active at scale 1 (scaling = alpha / rank); enable_lora_hotswap prepared
        # the first slot only: pad the others and turn every scaling into a tensor too.
        self.pipeline.set_adapters([SLOT.format(i) for i in range(len(self.slots))])
        prepare_model_for_compiled_hotswap(
            self._denoiser(), target_rank=self.hotswap_rank, check_compiled="ignore"
        )
        # set_adapters replaced the scaling tensors of slots loaded earlier: keep what they
        # held (their adapter's alpha / rank, which set_adapters does not know after a swap).
        earlier = dict(self._base_scaling)
        for position in range(len(self.slots)):
            self._remember_scaling(position, earlier.get(position))
            self._scale_slot(position, 0.0)
        self.active = ()

    def activate(self, loras: Sequence[LoraAdapter]) -> None:
        """Make ``loras`` (at their scales) the active adapters; none: the base model."""
        wanted = tuple((adapter.adapter_name, adapter.scale) for adapter in loras)
        if wanted == self.active:
            return
        if self.hotswap:
            self._activate_slots(loras, wanted)
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

    def _activate_slots(self, loras: Sequence[LoraAdapter], wanted: tuple[Any, ...]) -> None:
        if len(loras) > len(self.slots):
            self.prepare([loras])
        started = time.perf_counter()
        for position, held in enumerate(self.slots):
            adapter = loras[position] if position < len(loras) else None
            if adapter is not None and adapter.sha256 != held.sha256:
                load_started = time.perf_counter()
                try:
                    self._load(adapter, SLOT.format(position), hotswap=True)
                except (RuntimeError, ValueError) as error:
                    raise ValueError(
                        f"LoRA {adapter.source!r} cannot be hotswapped into the slot of "
                        f"{held.source!r} (a hotswapped LoRA must adapt the same layers or "
                        f"fewer): {error}; set compile 'off' for this set"
                    ) from error
                started += time.perf_counter() - load_started  # counted as loading
                self.slots[position] = adapter
                self._remember_scaling(position)
            self._scale_slot(position, adapter.scale if adapter is not None else 0.0)
        self.active = wanted
        self.switches += 1
        self.switch_seconds += time.perf_counter() - started

    def _denoiser(self) -> Any:
        from imagegen_pipeline.backends.compilation import denoiser_of

        return denoiser_of(self.pipeline)

    def _remember_scaling(
        self, position: int, earlier: list[tuple[Any, Any]] | None = None
    ) -> None:
        # A slot's scaling tensors hold alpha / rank of the adapter it holds (hotswap writes
        # them); a row's scale multiplies that, in place.
        from peft.tuners.lora import LoraLayer

        name = SLOT.format(position)
        current = [
            module.scaling[name]
            for module in self._denoiser().modules()
            if isinstance(module, LoraLayer) and name in module.scaling
        ]
        bases = [base for _, base in earlier] if earlier else [t.clone() for t in current]
        self._base_scaling[position] = list(zip(current, bases, strict=True))

    def _scale_slot(self, position: int, scale: float) -> None:
        for current, base in self._base_scaling[position]:
            current.copy_(base * scale)

    def planned_bytes(
        self, adapter_sets: Iterable[Sequence[LoraAdapter]], bytes_per_element: int
    ) -> dict[str, int]:
        """Memory the adapters of ``adapter_sets`` add to each component once loaded: every
        distinct adapter (each is loaded once and all stay loaded through the call) or,
        under hotswap, the slots padded to their rank."""
        sets = [tuple(loras) for loras in adapter_sets if loras]
        distinct = {a.sha256: a for loras in sets for a in loras}
        totals: dict[str, int] = {}
        if self.hotswap and sets:
            slots = max(len(self.slots), max(len(loras) for loras in sets))
            rank = self.hotswap_rank or max(lora_rank(a.path) for a in distinct.values())
            for adapter in distinct.values():
                own = lora_rank(adapter.path) or rank
                for component, count in lora_elements(adapter.path).items():
                    padded = slots * count * rank // own
                    totals[component] = max(totals.get(component, 0), padded)
        else:
            for adapter in distinct.values():
                for component, count in lora_elements(adapter.path).items():
                    totals[component] = totals.get(component, 0) + count
        return {component: count * bytes_per_element for component, count in totals.items()}

    def _load(self, adapter: LoraAdapter, name: str | None = None, hotswap: bool = False) -> None:
        from diffusers.utils import logging as diffusers_logging

        started = time.perf_counter()
        level = diffusers_logging.get_verbosity()
        # A UNet-only LoRA makes diffusers warn, per text encoder, that it found no keys for it.
        diffusers_logging.set_verbosity_error()
        try:
            self.pipeline.load_lora_weights(
                str(adapter.path.parent),
                weight_name=adapter.path.name,
                adapter_name=name or adapter.adapter_name,
                hotswap=hotswap,
            )
        finally:
            diffusers_logging.set_verbosity(level)
        self.loaded[name or adapter.adapter_name] = adapter
        self.loads += 1
        self.load_seconds += time.perf_counter() - started

    def release(self, still_needed: Iterable[str] = ()) -> None:
        """Delete the loaded adapters but those ``still_needed`` (hotswap slots stay)."""
        if self.hotswap:
            return
        keep = set(still_needed)
        done = [name for name in self.loaded if name not in keep]
        if done:
            self.pipeline.delete_adapters(done)
            for name in done:
                del self.loaded[name]
            self.active = tuple(item for item in self.active if item[0] in keep)
