"""The warm-model cache: hits, configuration changes, the memory budget and clearing."""

from __future__ import annotations

import pytest

from imagegen_pipeline import model_cache as model_cache_module
from imagegen_pipeline.model_cache import ModelCache, default_budget_bytes

GB = 2**30


class FakeModel:
    """Stands in for a loaded model: its size, and a log of when it was freed."""

    def __init__(self, label: str, size: int, freed: list[str]) -> None:
        self.label = label
        self.size = size
        self.freed = freed
        self.unloaded = False

    def unload(self) -> None:
        assert not self.unloaded, f"{self.label} unloaded twice"
        self.unloaded = True
        self.freed.append(self.label)

    def weight_bytes(self) -> int:
        return 0 if self.unloaded else self.size


@pytest.fixture
def freed() -> list[str]:
    return []


def maker(label: str, size: int, freed: list[str], created: list[str] | None = None):
    def create() -> FakeModel:
        if created is not None:
            created.append(label)
        return FakeModel(label, size, freed)

    return create


def test_same_key_is_a_hit(freed: list[str]) -> None:
    cache = ModelCache(budget_bytes=10 * GB)
    created: list[str] = []
    first, hit = cache.get("flux", ("cfg", 1), maker("flux-1", GB, freed, created))
    assert hit is False
    second, hit = cache.get("flux", ("cfg", 1), maker("flux-2", GB, freed, created))
    assert hit is True
    assert second is first
    assert created == ["flux-1"]
    assert freed == []


def test_changed_key_frees_the_old_model_before_creating_the_new(freed: list[str]) -> None:
    cache = ModelCache(budget_bytes=10 * GB)
    old, _ = cache.get("flux", "bf16", maker("flux-bf16", GB, freed))
    seen_at_creation: list[list[str]] = []

    def create_new() -> FakeModel:
        seen_at_creation.append(list(freed))  # a GPU cannot hold two copies
        return FakeModel("flux-fp32", GB, freed)

    new, hit = cache.get("flux", "fp32", create_new)
    assert hit is False
    assert new is not old
    assert old.unloaded
    assert seen_at_creation == [["flux-bf16"]]
    assert cache.names() == ["flux"]
    # And back: the bf16 configuration is no longer cached.
    _, hit = cache.get("flux", "bf16", maker("flux-bf16-again", GB, freed))
    assert hit is False
    assert freed == ["flux-bf16", "flux-fp32"]


def test_other_names_are_kept_side_by_side(freed: list[str]) -> None:
    cache = ModelCache(budget_bytes=10 * GB)
    cache.get("flux", 1, maker("flux", GB, freed))
    cache.get("clip", 1, maker("clip", GB, freed))
    assert cache.names() == ["flux", "clip"]
    _, hit = cache.get("flux", 1, maker("unused", GB, freed))
    assert hit is True
    assert cache.names() == ["clip", "flux"]  # least recently used first
    assert freed == []


def test_make_room_frees_least_recently_used_others_while_over_budget(freed: list[str]) -> None:
    cache = ModelCache(budget_bytes=5 * GB)
    cache.get("a", 1, maker("a", 2 * GB, freed))
    cache.get("b", 1, maker("b", 2 * GB, freed))
    cache.get("c", 1, maker("c", 1 * GB, freed))
    cache.get("a", 1, maker("unused", 0, freed))  # a becomes the most recently used
    cache.make_room(keep="d")
    assert freed == []  # 5 GB held: not over the budget

    cache.get("d", 1, maker("d", 2 * GB, freed))  # 7 GB held
    cache.make_room(keep="d")
    assert freed == ["b"]  # b was least recently used; 5 GB is within the budget
    assert cache.names() == ["c", "a", "d"]


def test_make_room_never_frees_keep(freed: list[str]) -> None:
    cache = ModelCache(budget_bytes=3 * GB)
    cache.get("small", 1, maker("small", GB, freed))
    cache.get("huge", 1, maker("huge", 8 * GB, freed))
    cache.make_room(keep="huge")
    assert freed == ["small"]
    assert cache.names() == ["huge"]  # still over budget, but it is the one in use
    cache.make_room(keep="huge")
    assert freed == ["small"]


def test_clear_frees_everything(freed: list[str]) -> None:
    cache = ModelCache(budget_bytes=10 * GB)
    models = [cache.get(name, 1, maker(name, GB, freed))[0] for name in ("a", "b", "c")]
    cache.clear()
    assert sorted(freed) == ["a", "b", "c"]
    assert all(model.unloaded for model in models)
    assert cache.names() == []
    _, hit = cache.get("a", 1, maker("a2", GB, freed))
    assert hit is False


def test_budget_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEGEN_MODEL_CACHE_GB", "1.5")
    assert default_budget_bytes() == 3 * 2**29
    assert ModelCache().budget_bytes == 3 * 2**29
    assert ModelCache(budget_bytes=123).budget_bytes == 123


def test_budget_without_the_variable_is_positive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGEGEN_MODEL_CACHE_GB", raising=False)
    assert default_budget_bytes() > 0
    assert isinstance(model_cache_module.WARM_MODELS, ModelCache)
