"""Best-of-N through Dagster: a gate in the images step, scorer columns, keepers and checks."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from imagegen_pipeline.definitions import defs
from imagegen_pipeline.defs.model_resources import settings_resource
from imagegen_pipeline.defs.partitions import partition_key, prompt_set_partitions
from imagegen_pipeline.registry import MODELS
from imagegen_pipeline.reviews import record_verdict
from imagegen_pipeline.storage import Storage
from imagegen_pipeline.tiny_models import build_tiny_model
from tests.conftest import resources_maker, temporary_instance

# "gated" asks for an HPS cosine of 2, which no image reaches: it spends its 3 candidates and
# keeps its best, flagged. "plain" draws its 3 candidates at once and keeps the best one.
CSV = """prompt_id,prompt,seed,candidates,select,scorer,min_score,backends
gated,a red cat on a blue sky,5,3,1,hpsv2,2.0,sdxl_turbo
plain,a dog in the city,6,3,1,hpsv2,,sdxl_turbo
"""


def test_a_gated_set_through_the_graph(
    tmp_path: Path, tiny_flux, tiny_sdxl, tiny_svd, tiny_open_clip
) -> None:
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "best.csv").write_text(CSV)
    hps = build_tiny_model(MODELS["hpsv2"], tmp_path / "models")
    make = resources_maker(tmp_path, prompts, tiny_flux, tiny_sdxl, tiny_svd, tiny_open_clip)
    resources = make(hpsv2=settings_resource(MODELS["hpsv2"].settings)(model=str(hps)))
    assets = [*defs.assets, *(defs.asset_checks or [])]
    with temporary_instance(tmp_path / "home") as instance:
        instance.add_dynamic_partitions(prompt_set_partitions.name, ["best"])
        prepared = dg.materialize(
            assets,
            selection=dg.AssetSelection.groups("prompts"),
            partition_key="best",
            instance=instance,
            resources=resources,
        )
        assert prepared.success
        result = dg.materialize(
            assets,
            selection=dg.AssetSelection.assets("images", "quality", "keepers"),
            partition_key=partition_key("best", "sdxl_turbo"),
            instance=instance,
            resources=resources,
        )
        assert result.success
        # A reviewer keeps the plain prompt's worst candidate: the verdict beats the score.
        tables = tmp_path / "storage" / "tables"
        chosen = pd.read_parquet(tables / "keepers" / "sdxl_turbo" / "best.parquet")
        plain = chosen[chosen["prompt_id"] == "plain"].sort_values("score")
        worst = plain.iloc[0]["image_id"]
        record_verdict(Storage(tmp_path / "storage"), "best", "sdxl_turbo", worst, "keep")
        again = dg.materialize(
            assets,
            selection=dg.AssetSelection.assets("keepers"),
            partition_key=partition_key("best", "sdxl_turbo"),
            instance=instance,
            resources=resources,
        )
        assert again.success
        reviewed = pd.read_parquet(tables / "keepers" / "sdxl_turbo" / "best.parquet")
        kept_plain = reviewed[(reviewed["prompt_id"] == "plain") & reviewed["kept"]]
        assert list(kept_plain["image_id"]) == [worst]
        assert set(kept_plain["verdict"]) == {"keep"}
    images = result.asset_materializations_for_node("images.generate_on_gpu")
    metadata = {k: v.value for k, v in images[0].metadata.items()}
    assert metadata["gate_retries"] == 2 and metadata["candidate_rounds"] == 3
    # The gate scored the gated prompt's first two candidates (its last one was left to the
    # quality step: no gate needed it); the plain prompt's three were scored at the end of the
    # step, as the tiny HPS fits in host memory beside the tiny generator.
    assert metadata["scored_in_step"] == 2 + 3
    assert metadata["scorer_placement"]["hpsv2"].startswith("images step: hpsv2 ")

    tables = tmp_path / "storage" / "tables"
    quality = pd.read_parquet(tables / "quality" / "sdxl_turbo" / "best.parquet")
    assert quality["score_hpsv2"].notna().all() and len(quality) == 6
    assert set(quality["score_hpsv2_model"]) == {f"local-dir:{hps}"}
    keepers = chosen
    kept = keepers[keepers["kept"]].set_index("prompt_id")
    assert sorted(kept.index) == ["gated", "plain"]
    assert bool(kept.loc["gated", "below_gate"]) and not kept.loc["plain", "below_gate"]
    best = keepers[keepers["prompt_id"] == "plain"]["score"].max()
    assert kept.loc["plain", "score"] == pytest.approx(best)

    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    below = checks["prompts_below_gate"]
    assert not below.passed and below.severity == dg.AssetCheckSeverity.WARN
    assert below.metadata["share_below_gate"].value == 0.5
    assert checks["every_prompt_has_a_keeper"].passed
