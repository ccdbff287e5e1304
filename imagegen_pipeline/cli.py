"""``imagegen``: the demo run, and getting model weights.

imagegen demo                      # the whole graph on prompts/example.csv
imagegen models pull flux_schnell  # download weights on a machine that reaches the hub
imagegen models tiny               # build the tiny random-weight test models
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from imagegen_pipeline.model_weights import WEIGHT_SOURCES, is_cached, pull
from imagegen_pipeline.prompt_csv import prompt_set_name

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOCAL_MODELS = {
    "flux_schnell": "IMAGEGEN_FLUX_SCHNELL_MODEL",
    "sdxl_turbo": "IMAGEGEN_SDXL_TURBO_MODEL",
}
TINY_IMAGE_SIDE = 256  # the tiny models draw noise: small images keep the demo fast on a CPU
# Tiny SVD's smallest clips (64 px is its minimum side; no guidance halves the UNet calls):
# about a second each on a CPU, so a clip per prompt keeps the demo well under two minutes.
TINY_SVD_SETTINGS = {
    "width": 64, "height": 64, "num_frames": 4, "steps": 2, "decode_chunk_size": 4,
    "max_guidance_scale": 1.0,
}  # fmt: skip


def ensure_dagster_home() -> Path:
    """A project-local DAGSTER_HOME using the top-level dagster.yaml, unless one is set."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / ".dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists() and (PROJECT_ROOT / "dagster.yaml").exists():
        shutil.copyfile(PROJECT_ROOT / "dagster.yaml", config)
    return home


def _choose_models(models_dir: Path) -> dict[str, tuple[str, bool]]:
    """Per local backend: (model, is_tiny). Real weights win when they are on this machine."""
    from imagegen_pipeline.tiny_models import build_tiny_model, is_tiny_model

    chosen = {}
    for backend, variable in LOCAL_MODELS.items():
        configured = os.getenv(variable)
        if configured:
            chosen[backend] = (configured, is_tiny_model(Path(configured)))
        elif is_cached(WEIGHT_SOURCES[backend].repo_id):
            chosen[backend] = (WEIGHT_SOURCES[backend].repo_id, False)
        else:
            chosen[backend] = (str(build_tiny_model(backend, models_dir)), True)
    return chosen


def _choose_clip_and_scoring_models(models_dir: Path) -> dict[str, tuple[str, bool]]:
    """Per resource (svd, clip_scorer): (model, is_tiny). Real weights win when they are here."""
    from imagegen_pipeline.model_weights import ModelWeightsMissingError
    from imagegen_pipeline.scoring.clip_scorer import ClipScorerConfig, open_clip_source
    from imagegen_pipeline.tiny_models import build_tiny_model, is_tiny_model

    chosen = {}
    svd_repo = WEIGHT_SOURCES["svd_xt"].repo_id
    configured = os.getenv("IMAGEGEN_SVD_MODEL")
    if configured:
        chosen["svd"] = (configured, is_tiny_model(Path(configured)))
    elif is_cached(svd_repo):
        chosen["svd"] = (svd_repo, False)
    else:
        chosen["svd"] = (str(build_tiny_model("svd_xt", models_dir)), True)
    configured = os.getenv("IMAGEGEN_CLIP_MODEL")
    if configured:
        folder = Path(configured.removeprefix("local-dir:"))
        chosen["clip_scorer"] = (configured, is_tiny_model(folder))
        return chosen
    try:
        open_clip_source(ClipScorerConfig())  # ViT-L-14/openai, from the local cache only
        chosen["clip_scorer"] = (ClipScorerConfig().model, False)
    except ModelWeightsMissingError:
        tiny = build_tiny_model("open_clip_vit_l_14", models_dir)
        chosen["clip_scorer"] = (f"local-dir:{tiny}", True)
    return chosen


def demo(args: argparse.Namespace) -> int:
    """Run the whole graph on one prompt CSV and say where everything landed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    home = ensure_dagster_home()
    import dagster as dg

    from imagegen_pipeline.definitions import defs
    from imagegen_pipeline.defs.resources import reconfigured
    from imagegen_pipeline.local_runner import materialize_prompt_set, release_interrupted_runs

    csv_path = Path(args.prompts).resolve()
    storage_dir = Path(os.getenv("IMAGEGEN_STORAGE_DIR", "storage")).resolve()
    started = time.perf_counter()
    models = _choose_models(storage_dir / "models" / "tiny")
    resources = dict(defs.resources or {})
    resources["storage"] = reconfigured(
        resources["storage"], prompts_dir=str(csv_path.parent), base_dir=str(storage_dir)
    )
    resources["io_manager"] = reconfigured(resources["io_manager"], storage=resources["storage"])
    for backend, (model, tiny) in models.items():
        update: dict = {"model": model}
        if tiny:
            update |= {"width": TINY_IMAGE_SIDE, "height": TINY_IMAGE_SIDE}
            print(f"! {backend}: no real weights here, using a TINY RANDOM-WEIGHT model ({model}):")
            print("  its images are noise. `imagegen models pull` fetches the real weights.")
        resources[backend] = reconfigured(resources[backend], **update)
    auxiliary = _choose_clip_and_scoring_models(storage_dir / "models" / "tiny")
    for name, (model, tiny) in auxiliary.items():
        update = {"model": model, **(TINY_SVD_SETTINGS if tiny and name == "svd" else {})}
        if tiny:
            print(f"! {name}: no real weights here, using a TINY RANDOM-WEIGHT model ({model}):")
            print("  its clips and scores are noise. `imagegen models pull` fetches real weights.")
        resources[name] = reconfigured(resources[name], **update)
    if all(tiny for _, tiny in [*models.values(), *auxiliary.values()]):
        # Tiny models run tiny kernels: extra CPU threads only spin-wait, and stall for whole
        # seconds per call when another process holds a core (SVD's many small ops worst).
        import torch

        torch.set_num_threads(1)
    backends = [backend for backend in models if backend in args.backends]
    if "gemini" in args.backends:
        if os.getenv("GEMINI_API_KEY"):
            backends.append("gemini")
        else:
            print("! gemini left out: GEMINI_API_KEY is not set.")

    prompt_set = prompt_set_name(csv_path)
    with dg.DagsterInstance.get() as instance:
        for run_id in release_interrupted_runs(instance):
            print(f"! run {run_id} was interrupted; marked failed and its GPU slot freed.")
        results = materialize_prompt_set(
            defs, prompt_set, backends, instance=instance, resources=resources, raise_on_error=False
        )
    failed = [r.run_id for r in results if not r.success]
    print(
        f"\nPrompt set {prompt_set!r}, backends {', '.join(backends)}: "
        f"{len(results)} runs in {time.perf_counter() - started:.1f} s, {len(failed)} failed."
    )
    print(f"  images:        {storage_dir / 'images' / prompt_set}")
    print(f"  tables:        {storage_dir / 'tables'}")
    print(
        f"  run metadata:  {storage_dir / 'run_metadata'} (imagegen_pipeline.run_metadata."
        "load_run_metadata)"
    )
    for extra in ("clips", "quality", "reports"):
        if (storage_dir / extra / prompt_set).exists():
            print(f"  {extra + ':':14} {storage_dir / extra / prompt_set}")
    print(f"  Dagster runs:  {home} (see them with `make ui`)")
    return 1 if failed else 0


def models(args: argparse.Namespace) -> int:
    """Pull real weights, or build the tiny random-weight ones."""
    if args.action == "pull":
        for name in args.names or list(WEIGHT_SOURCES):
            print(f"{name}: {pull(name, args.revision)}")
        return 0
    from imagegen_pipeline.tiny_models import TINY_MODELS, build_tiny_model

    for name in args.names or list(TINY_MODELS):
        print(f"{name}: {build_tiny_model(name, Path(args.root))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``imagegen`` command."""
    parser = argparse.ArgumentParser(
        prog="imagegen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="run the whole graph on one prompt CSV")
    demo_parser.add_argument("--prompts", default=str(PROJECT_ROOT / "prompts" / "example.csv"))
    demo_parser.add_argument(
        "--backends", nargs="+", default=["flux_schnell", "sdxl_turbo", "gemini"],
        help="backends to run (gemini only when GEMINI_API_KEY is set)",
    )  # fmt: skip
    demo_parser.set_defaults(func=demo)
    models_parser = commands.add_parser("models", help="get model weights")
    models_parser.add_argument("action", choices=["pull", "tiny"])
    models_parser.add_argument(
        "names",
        nargs="*",
        help="flux_schnell, sdxl_turbo, svd_xt, "
        "open_clip or a hub repo id (pull); tiny model names (tiny)",
    )
    models_parser.add_argument("--revision", default=None)
    models_parser.add_argument("--root", default="storage/models/tiny")
    models_parser.set_defaults(func=models)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
