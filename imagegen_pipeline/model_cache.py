"""Models kept warm in this process between steps, within a memory budget.

A celery GPU worker (or one in-process run) executes many small steps of the same backend; each
would otherwise load the same weights again. The cache keeps the last model of each name, keyed
by its full configuration: the same configuration is a hit, a changed one frees the old model
first (a GPU cannot hold two FLUX copies), and when the models held exceed the budget the least
recently used ones are freed.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from imagegen_pipeline.project_config import load_project_config

logger = logging.getLogger(__name__)


class CachedModel(Protocol):
    """What the cache needs of a model."""

    def unload(self) -> None: ...

    def weight_bytes(self) -> int: ...


M = TypeVar("M", bound=CachedModel)


@dataclass
class _Entry:
    key: Hashable
    model: Any


def default_budget_bytes() -> int:
    """``model_cache_gb`` (imagegen.toml or IMAGEGEN_MODEL_CACHE_GB), else 90 % of the GPU's
    memory, else half of this machine's RAM."""
    configured = load_project_config().model_cache_gb
    if configured:
        return int(configured * 2**30)
    import psutil

    try:
        import torch

        if torch.cuda.is_available():
            return int(0.9 * torch.cuda.get_device_properties(0).total_memory)
    except ImportError:  # no torch: only remote backends, which hold no weights
        pass
    return int(0.5 * psutil.virtual_memory().total)


class ModelCache:
    """At most one model per name, keyed by configuration, evicted least recently used first."""

    def __init__(self, budget_bytes: int | None = None) -> None:
        self._budget = budget_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def budget_bytes(self) -> int:
        """The most weight bytes held at once."""
        if self._budget is None:
            self._budget = default_budget_bytes()
        return self._budget

    def get(self, name: str, key: Hashable, create: Callable[[], M]) -> tuple[M, bool]:
        """The cached model of ``name`` for ``key`` (``True``), or a new one (``False``).

        A new model is created, not loaded: the step loads it only if it has work."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry.key == key:
                self._entries.move_to_end(name)
                return entry.model, True
            if entry is not None:
                logger.info("%s: configuration changed; freeing the model loaded before.", name)
                self._free(name)
            model = create()
            self._entries[name] = _Entry(key, model)
            return model, False

    def make_room(self, keep: str) -> None:
        """Free least recently used models other than ``keep`` while over the budget."""
        with self._lock:
            while True:
                victim = next((name for name in self._entries if name != keep), None)
                # With nothing else held there is nothing to free, and no reason to ask torch
                # for the free memory (a step that made nothing never imported it).
                if victim is None or self._held_bytes() <= self.budget_bytes:
                    return
                logger.info("Model cache over budget: freeing %s.", victim)
                self._free(victim)

    def clear(self) -> None:
        """Free every model."""
        with self._lock:
            for name in list(self._entries):
                self._free(name)

    def names(self) -> list[str]:
        """Names of the models held, least recently used first."""
        return list(self._entries)

    def _held_bytes(self) -> int:
        return sum(entry.model.weight_bytes() for entry in self._entries.values())

    def _free(self, name: str) -> None:
        entry = self._entries.pop(name)
        entry.model.unload()


# The process's cache: a celery worker process, a run worker with the in-process executor, or a
# test process keeps its models here between steps.
WARM_MODELS = ModelCache()
