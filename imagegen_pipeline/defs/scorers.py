"""The preference scorers a step ranks by, as warm models created on first use."""

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import dagster as dg

from imagegen_pipeline.defs.gpu import model_for_step
from imagegen_pipeline.project_config import ProjectConfig
from imagegen_pipeline.registry import SCORERS
from imagegen_pipeline.steps.candidate_scores import ScorerHandle

# Every scorer's resource: the steps that may score need all of them.
SCORER_RESOURCE_KEYS = frozenset(spec.name for spec in SCORERS.values())


@contextmanager
def scorer_handles(
    context: dg.OpExecutionContext | dg.AssetExecutionContext,
    names: Iterable[str],
    project: ProjectConfig,
) -> Iterator[dict[str, ScorerHandle]]:
    """A handle per scorer name, resolved now (only these: resolving one may build its tiny
    stand-in) and kept warm for the next step; each model is created when first used."""
    with ExitStack() as stack:
        handles = {}
        for name in sorted(set(names)):
            warm: Any = stack.enter_context(model_for_step(context, SCORERS[name], project))
            revision = getattr(warm.settings, "revision", None) or "main"
            label = warm.settings.scorer_label(warm.model_id)
            handles[name] = ScorerHandle(name, label, revision, lambda warm=warm: warm.model)
        yield handles
