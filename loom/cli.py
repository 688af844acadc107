"""The ``loom`` command. It holds no logic: each package's own ``cli.py`` adds its commands.

Each package exposes ``add_commands(subparsers)``; a command sets ``func`` (``args -> int``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from benchmarks import cli as benchmarks_cli
from deploy import cli as deploy_cli
from models import cli as models_cli
from serving import cli as serving_cli
from training import cli as training_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loom", description="Loom: serve and train models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serving_cli.add_commands(subparsers)
    models_cli.add_commands(subparsers)
    training_cli.add_commands(subparsers)
    deploy_cli.add_commands(subparsers)
    benchmarks_cli.add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
