"""``imagegen``: the demo run, and getting model weights.

imagegen demo                      # the whole graph on every CSV of the prompts folder
imagegen models pull flux_schnell  # download weights on a machine that reaches the hub
imagegen models tiny               # build the tiny random-weight test models
imagegen verify [SET]              # sha256-check every stored image and clip; quarantine damage
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from imagegen_pipeline.model_weights import pull
from imagegen_pipeline.registry import BACKEND_NAMES, MODELS, enabled_backends

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def ensure_dagster_home() -> Path:
    """A project-local DAGSTER_HOME using the top-level dagster.yaml, unless one is set."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / ".dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists() and (PROJECT_ROOT / "dagster.yaml").exists():
        shutil.copyfile(PROJECT_ROOT / "dagster.yaml", config)
    return home


def announce_models() -> bool:
    """Print what every local model resolves to (building tiny stand-ins where needed);
    returns True when every one of them is a tiny stand-in."""
    from imagegen_pipeline.model_resolution import resolve_model
    from imagegen_pipeline.project_config import load_project_config

    project = load_project_config()
    all_tiny = True
    for spec in MODELS.values():
        if not spec.is_local:
            continue
        resolved = resolve_model(spec, "auto", project)
        all_tiny &= resolved.is_tiny
        if resolved.notice:
            print(f"! {resolved.notice}")
        else:
            print(f"  {spec.name}: {resolved.model}")
    return all_tiny


def demo(args: argparse.Namespace) -> int:
    """Run the whole graph on the prompt CSVs and say where everything landed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.prompts:
        os.environ["IMAGEGEN_PROMPTS_DIR"] = str(Path(args.prompts).resolve())
    home = ensure_dagster_home()
    import dagster as dg

    from imagegen_pipeline.definitions import defs
    from imagegen_pipeline.defs.prompts.assets import prompt_csv_files
    from imagegen_pipeline.local_runner import materialize_prompt_sets, release_interrupted_runs
    from imagegen_pipeline.project_config import load_project_config

    project = load_project_config()
    started = time.perf_counter()
    prompt_sets = sorted(prompt_csv_files(project.prompts_dir))
    if not prompt_sets:
        print(f"No prompt CSV in {project.prompts_dir}/: add one (see README, Prompt CSV format).")
        return 1
    announce_models()
    backends = [name for name in enabled_backends(args.backends) if name in args.backends]
    if "gemini" in args.backends and "gemini" not in backends:
        print("! gemini left out: GEMINI_API_KEY is not set.")
    with dg.DagsterInstance.get() as instance:
        for run_id in release_interrupted_runs(instance):
            print(f"! run {run_id} was interrupted; marked failed and its GPU slot freed.")
        results = materialize_prompt_sets(
            defs, prompt_sets, backends, instance=instance, raise_on_error=False
        )
    failed = [r.run_id for r in results if not r.success]
    storage = project.storage
    print(
        f"\nPrompt sets {', '.join(prompt_sets)}; backends {', '.join(backends)}: "
        f"{len(results)} runs in {time.perf_counter() - started:.1f} s, {len(failed)} failed."
    )
    print(f"  images:        {storage}/images/<prompt set>/<backend>/")
    print(f"  clips:         {storage}/clips/<prompt set>/<backend>/")
    print(f"  galleries:     {storage}/reports/<prompt set>/gallery.html")
    print(f"  tables:        {storage}/tables/<asset>/")
    print(
        f"  run metadata:  {storage}/run_metadata/ "
        "(imagegen_pipeline.run_metadata.load_run_metadata)"
    )
    print(f"  Dagster runs:  {home} (see them with `make ui`)")
    return 1 if failed else 0


def models(args: argparse.Namespace) -> int:
    """Pull real weights, or build the tiny random-weight ones."""
    if args.action == "pull":
        names = args.names or [name for name, spec in MODELS.items() if spec.weights]
        for name in names:
            print(f"{name}: {pull(name, args.revision)}")
        return 0
    from imagegen_pipeline.project_config import load_project_config
    from imagegen_pipeline.tiny_models import TINY_MODELS, build_tiny_model

    root = Path(args.root) if args.root else load_project_config().tiny_models_dir
    names = args.names or [spec.tiny_model for spec in MODELS.values() if spec.tiny_model]
    for name in names:
        builder = MODELS[name].tiny_model if name in MODELS else name
        if builder not in TINY_MODELS:
            print(f"{name}: no tiny model (known: {', '.join(sorted(TINY_MODELS))})")
            return 2
        print(f"{name}: {build_tiny_model(builder, root)}")
    return 0


def verify(args: argparse.Namespace) -> int:
    """Check every stored image and clip against its row; 1 when something was damaged."""
    from imagegen_pipeline.project_config import load_project_config
    from imagegen_pipeline.steps.verify import verify_stored_outputs
    from imagegen_pipeline.storage import Storage

    found = verify_stored_outputs(Storage(load_project_config().storage), args.prompt_set)
    for (table, prompt_set, backend), damaged in found.items():
        print(f"  {table} {prompt_set}/{backend}: {damaged} damaged")
    total = sum(found.values())
    print(f"{total} damaged file(s) moved to the quarantine; the next run makes them again.")
    return 1 if total else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``imagegen`` command."""
    parser = argparse.ArgumentParser(
        prog="imagegen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="run the whole graph on the prompt CSVs")
    demo_parser.add_argument("--prompts", help="a folder of prompt CSVs (default: the project's)")
    demo_parser.add_argument(
        "--backends",
        nargs="+",
        default=list(BACKEND_NAMES),
        help="backends to run (gemini only when GEMINI_API_KEY is set)",
    )
    demo_parser.set_defaults(func=demo)
    models_parser = commands.add_parser("models", help="get model weights")
    models_parser.add_argument("action", choices=["pull", "tiny"])
    models_parser.add_argument(
        "names", nargs="*", help=f"{', '.join(MODELS)} or a hub repo id (pull)"
    )
    models_parser.add_argument("--revision", default=None)
    models_parser.add_argument("--root", default=None, help="folder for tiny models")
    models_parser.set_defaults(func=models)
    verify_parser = commands.add_parser("verify", help="check stored files against their rows")
    verify_parser.add_argument("prompt_set", nargs="?", help="one prompt set (default: all)")
    verify_parser.set_defaults(func=verify)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
