"""``loom models ...``: list, show, register and promote models in the store under ``LOOM_HOME``.

    loom models list [--json]
    loom models show NAME [--json]
    loom models register NAME PATH --task embed [--version V]
    loom models promote NAME VERSION [--alias serving]

The bundled model is registered before ``list`` and ``show``, so it always appears. A store
error prints ``error: <message>`` on stderr and exits 1, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from models.bundled import ensure_bundled
from models.errors import ModelNotFound, StoreError
from models.manifest import Manifest
from models.settings import LoomEnv
from models.store import SERVING_ALIAS, TASKS, ModelInfo, ModelStore


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``models`` and its subcommands to the ``loom`` parser's ``subparsers``."""
    models = subparsers.add_parser("models", help="list, show and register stored models")
    commands = models.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)

    list_parser = commands.add_parser("list", help="every stored model, one line each")
    list_parser.add_argument("--json", action="store_true", help="print JSON for machines")
    list_parser.set_defaults(func=_guarded(cmd_list))

    show = commands.add_parser("show", help="one model's versions, files and aliases")
    show.add_argument("name", help="the model's name")
    show.add_argument("--json", action="store_true", help="print JSON for machines")
    show.set_defaults(func=_guarded(cmd_show))

    register = commands.add_parser("register", help="copy a safetensors folder into the store")
    register.add_argument("name", help="the model's name, e.g. my-encoder")
    register.add_argument("path", type=Path, help="folder holding the model's files")
    register.add_argument("--task", required=True, choices=sorted(TASKS))
    register.add_argument("--version", default=None, help="default: the next number")
    register.set_defaults(func=_guarded(cmd_register))

    promote = commands.add_parser(
        "promote",
        help="point the serving alias at a version; a running server rolls it out",
    )
    promote.add_argument("name", help="the model's name")
    promote.add_argument("version", help="the stored version to serve, e.g. 2")
    promote.add_argument(
        "--alias", default=SERVING_ALIAS, help=f"the alias to move (default {SERVING_ALIAS})"
    )
    promote.set_defaults(func=_guarded(cmd_promote))


def cmd_list(args: argparse.Namespace) -> int:
    store = _store()
    ensure_bundled(store)
    infos = store.list_models()
    if args.json:
        _print_json([_info_dict(info) for info in infos])
        return 0
    rows = [
        (
            info.name,
            info.task,
            ", ".join(m.version for m in info.versions),
            ", ".join(f"{alias}={version}" for alias, version in sorted(info.aliases.items()))
            or "-",
        )
        for info in infos
    ]
    _print_table(("NAME", "TASK", "VERSIONS", "ALIASES"), rows)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store = _store()
    ensure_bundled(store)
    info = store.show(args.name)
    if args.json:
        _print_json(_info_dict(info))
        return 0
    print(f"name:    {info.name}")
    print(f"task:    {info.task}")
    aliases = ", ".join(f"{a}={v}" for a, v in sorted(info.aliases.items())) or "-"
    print(f"aliases: {aliases}")
    for manifest in info.versions:
        print()
        _print_manifest_summary(manifest)
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    manifest = _store().register(args.name, args.path, task=args.task, version=args.version)
    print(f"registered {manifest.name}@{manifest.version}")
    _print_manifest_summary(manifest)
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Move the alias. Serving follows it with no restart: the rollout reconciler of each
    running server starts the version, moves traffic once it is ready, then drains the old."""
    store = _store()
    if not store.has(args.name):
        raise ModelNotFound(f"no model named {args.name!r} in the store at {store.root}")
    # ModelNotFound names the versions
    previous = store.set_alias(args.name, args.alias, args.version)
    if previous == args.version:
        print(f"{args.name}#{args.alias} already points at version {args.version}")
    else:
        moved = f"{args.alias}: {previous or '-'} -> {args.version}"
        print(f"promoted {args.name}@{args.version} ({moved})")
    return 0


def _guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn a ``StoreError`` into ``error: <message>`` on stderr and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except StoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    run.__name__ = command.__name__
    run.__doc__ = command.__doc__
    return run


def _store() -> ModelStore:
    return ModelStore(LoomEnv.from_environ().models_dir)


def _info_dict(info: ModelInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "task": info.task,
        "aliases": dict(sorted(info.aliases.items())),
        "versions": [manifest.to_dict() for manifest in info.versions],
    }


def _print_manifest_summary(manifest: Manifest) -> None:
    size_mb = manifest.total_size_bytes / 1e6
    print(f"version: {manifest.version}  task: {manifest.task}  created: {manifest.created_at}")
    print(f"source:  {manifest.source}")
    print(f"files:   {len(manifest.files)} ({size_mb:.1f} MB)")
    for entry in manifest.files:
        print(f"  {entry.sha256[:12]}  {entry.size_bytes:>12,d}  {entry.path}")


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip())


def _print_json(data: object) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")
