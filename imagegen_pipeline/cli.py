"""``imagegen``: the demo run, and getting model weights.

imagegen demo                      # the whole graph on every CSV of the prompts folder
imagegen home                      # create and migrate DAGSTER_HOME (`make ui` runs it first)
imagegen models list               # every model, its weights and where they come from
imagegen models pull flux_schnell  # download weights on a machine that reaches the hub
imagegen models tiny               # build the tiny random-weight test models
imagegen verify [SET]              # sha256-check every stored image and clip; quarantine damage
imagegen review [--host H] [--port P]                 # the review web app (127.0.0.1:8765)
imagegen regenerate SET PROMPT_ID [--index I] [--backend B] [--seed S | --new-seed]
imagegen export SET [--keepers-only] DEST             # chosen images, manifest.csv (dir or zip)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from filelock import FileLock

from imagegen_pipeline.model_spec import WeightSource
from imagegen_pipeline.model_weights import pull
from imagegen_pipeline.registry import (
    CLIP_MODEL,
    MODELS,
    SCORERS,
    configured_backends,
    enabled_backends,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


HOME_LOCK = ".imagegen-home.lock"


def ensure_dagster_home() -> Path:
    """A project-local DAGSTER_HOME using the top-level dagster.yaml unless one is set, its
    databases created and migrated.

    Dagster's SQLite set-up is not safe across processes: two first starts on a fresh home can
    each stamp a migration head, and every later command then fails on "more than one head".
    So the home is set up under a file lock, by every entry point (`imagegen`, `make ui`).
    """
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / ".dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(home / HOME_LOCK):
        _install_config(home / "dagster.yaml")
        import dagster as dg

        with dg.DagsterInstance.get() as instance:
            instance.get_runs(limit=1)  # run, event-log and schedule storages now exist
    return home


def _install_config(config: Path) -> None:
    """Copy the project's dagster.yaml into the home when it is missing there or older (what
    make did), through a rename so no process reads half a file."""
    source = PROJECT_ROOT / "dagster.yaml"
    if not source.exists():
        return
    if config.exists() and config.stat().st_mtime >= source.stat().st_mtime:
        return
    temp = config.with_name(f".{config.name}.tmp")
    shutil.copyfile(source, temp)
    os.replace(temp, config)


def setup_home(args: argparse.Namespace) -> int:
    """Create and migrate the Dagster home, so `dagster dev` starts on a ready one."""
    print(f"Dagster home: {ensure_dagster_home()}")
    return 0


def announce_models() -> bool:
    """Print what every local model resolves to (building tiny stand-ins where needed);
    returns True when every one of them is a tiny stand-in."""
    from imagegen_pipeline.model_resolution import resolve_model
    from imagegen_pipeline.project_config import load_project_config

    project = load_project_config()
    all_tiny = True
    for spec in MODELS.values():
        # Best-of-N scorers other than CLIP load only for rows that name them (resolved then).
        if not spec.is_local or (spec in SCORERS.values() and spec is not CLIP_MODEL):
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
    only = None  # --prompts FILE: that file's set alone, read from its folder
    if args.prompts:
        given = Path(args.prompts).resolve()
        if given.is_file():
            only, given = given, given.parent
        os.environ["IMAGEGEN_PROMPTS_DIR"] = str(given)
    home = ensure_dagster_home()
    import dagster as dg

    from imagegen_pipeline.definitions import defs
    from imagegen_pipeline.local_runner import materialize_prompt_sets, release_interrupted_runs
    from imagegen_pipeline.project_config import load_project_config
    from imagegen_pipeline.prompt_folder import find_prompt_csvs

    project = load_project_config()
    started = time.perf_counter()
    found = find_prompt_csvs(project.prompts_dir)
    chosen = {name for name, paths in found.paths.items() if only is None or only in paths}
    for name, problem in found.problems.items():
        if name in chosen:
            print(f"! {problem}; left out.")
    prompt_sets = sorted(chosen & set(found.files))
    if not prompt_sets:
        if only is not None:
            print(f"{only}: not a usable prompt CSV (see README, Prompt CSV format).")
        else:
            print(
                f"No prompt CSV in {project.prompts_dir}/: add one (see README, Prompt CSV format)."
            )
        return 1
    announce_models()
    wanted = args.backends or configured_backends(project)
    backends = enabled_backends(wanted)
    for name in wanted:
        if name in MODELS and name not in backends:
            print(f"! {name} left out: {MODELS[name].key_env_var} is not set.")
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
    if args.action == "list":
        for spec in MODELS.values():
            source = spec.weights.repo_id if spec.weights else "hosted API"
            print(f"{spec.name:14} {spec.role:8} {spec.default_model}  ({source})")
        return 0
    if args.action == "pull":
        names = args.names or [name for name, spec in MODELS.items() if spec.weights]
        failed = 0
        for name in names:
            # A registered model pulls its own files; anything else is a whole hub repo.
            spec = MODELS.get(name)
            source = spec.weights if spec and spec.weights else WeightSource(name)
            try:
                print(f"{name}: {pull(source, args.revision)}")
            except Exception as error:  # offline, unknown repo, gated: say which and go on
                print(f"{name}: could not pull {source.repo_id}: {type(error).__name__}: {error}")
                failed += 1
        return 1 if failed else 0
    from imagegen_pipeline.project_config import load_project_config
    from imagegen_pipeline.tiny_models import build_tiny_model

    root = Path(args.root) if args.root else load_project_config().tiny_models_dir
    buildable = {name: spec for name, spec in MODELS.items() if spec.tiny_builder}
    for name in args.names or list(buildable):
        if name not in buildable:
            print(f"{name}: no tiny model (known: {', '.join(buildable)})")
            return 2
        print(f"{name}: {build_tiny_model(buildable[name], root)}")
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


def review(args: argparse.Namespace) -> int:
    """Serve the review app until interrupted."""
    from imagegen_pipeline.defs.quality.resources import QualityThresholds
    from imagegen_pipeline.project_config import api_key, load_project_config
    from imagegen_pipeline.review_app import TOKEN_VARIABLE, serve
    from imagegen_pipeline.storage import Storage

    gate = args.gate if args.gate is not None else QualityThresholds().min_clip_score
    storage = Storage(load_project_config().storage)
    serve(storage, args.host, args.port, api_key(TOKEN_VARIABLE), gate)
    return 0


def regenerate(args: argparse.Namespace) -> int:
    """Make one image slot again (every backend that has it, or --backend), in this process."""
    ensure_dagster_home()
    import dagster as dg

    from imagegen_pipeline.definitions import defs

    config = {
        "prompt_set": args.prompt_set,
        "prompt_id": args.prompt_id,
        "index": args.index,
        "backend": args.backend or "",
        "seed": args.seed,
        "new_seed": args.seed is None,
    }
    with dg.DagsterInstance.get() as instance:
        result = defs.resolve_job_def("regenerate_images").execute_in_process(
            instance=instance,
            run_config={"ops": {"regenerate": {"config": config}}},
            raise_on_error=False,
        )
    if not result.success:
        failed = next((e.step_failure_data for e in result.all_events if e.is_step_failure), None)
        reason = result.run_id
        if failed is not None:
            user = failed.user_failure_data
            reason = user.description if user and user.description else failed.error.message
        print(f"regenerate failed: {reason}")
        return 1
    print(f"Regenerated {args.prompt_set}/{args.prompt_id}[{args.index}] (run {result.run_id}).")
    return 0


def export(args: argparse.Namespace) -> int:
    """Write a prompt set's chosen images and manifest.csv to a folder or a .zip."""
    from imagegen_pipeline.project_config import load_project_config
    from imagegen_pipeline.steps.export import export_set
    from imagegen_pipeline.storage import Storage

    storage = Storage(load_project_config().storage)
    count = export_set(storage, args.prompt_set, Path(args.dest), args.keepers_only)
    print(f"{count} image(s) of {args.prompt_set} and manifest.csv written to {args.dest}")
    return 0 if count else 1


def add_review_commands(commands: argparse._SubParsersAction) -> None:
    """The review app, one-image regeneration and export."""
    review_parser = commands.add_parser("review", help="the review web app")
    review_parser.add_argument("--host", default="127.0.0.1", help="another host needs a token")
    review_parser.add_argument("--port", type=int, default=8765)
    review_parser.add_argument("--gate", type=float, default=None, help="CLIP score gate")
    review_parser.set_defaults(func=review)
    regen = commands.add_parser("regenerate", help="make one image again with a new seed")
    regen.add_argument("prompt_set")
    regen.add_argument("prompt_id")
    regen.add_argument("--index", type=int, default=0, help="image index within the prompt")
    regen.add_argument("--backend", default=None, help="default: every backend with the image")
    seeds = regen.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None, help="this seed")
    seeds.add_argument(
        "--new-seed", action="store_true", help="the next deterministic seed (the default)"
    )
    regen.set_defaults(func=regenerate)
    export_parser = commands.add_parser("export", help="the chosen images and a manifest CSV")
    export_parser.add_argument("prompt_set")
    export_parser.add_argument("dest", help="a folder, or a file ending in .zip")
    export_parser.add_argument(
        "--keepers-only", action="store_true", help="only the keepers (and images a reviewer kept)"
    )
    export_parser.set_defaults(func=export)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``imagegen`` command."""
    parser = argparse.ArgumentParser(
        prog="imagegen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="run the whole graph on the prompt CSVs")
    demo_parser.add_argument(
        "--prompts", help="a prompt CSV, or a folder of them (default: the project's folder)"
    )
    demo_parser.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help="backends to run (default: the project's; an API backend only when its key is set)",
    )
    demo_parser.set_defaults(func=demo)
    home_parser = commands.add_parser(
        "home", help="create and migrate DAGSTER_HOME (safe to run alongside other commands)"
    )
    home_parser.set_defaults(func=setup_home)
    models_parser = commands.add_parser("models", help="get model weights")
    models_parser.add_argument("action", choices=["list", "pull", "tiny"])
    models_parser.add_argument(
        "names", nargs="*", help=f"{', '.join(MODELS)} or a hub repo id (pull)"
    )
    models_parser.add_argument("--revision", default=None)
    models_parser.add_argument("--root", default=None, help="folder for tiny models")
    models_parser.set_defaults(func=models)
    verify_parser = commands.add_parser("verify", help="check stored files against their rows")
    verify_parser.add_argument("prompt_set", nargs="?", help="one prompt set (default: all)")
    verify_parser.set_defaults(func=verify)
    add_review_commands(commands)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
