"""``loom keys``: named API keys in ``$LOOM_HOME/keys.json`` (``serving.config.key_file``).

    loom keys create ci-bot --scopes infer,jobs    # prints the new key once, on stdout
    loom keys list                                 # names, scopes and creation times
    loom keys revoke ci-bot

The file holds salted hashes only; ``loom serve`` reads it at start, so a change takes effect
at the next start. A created or revoked key is a line of the audit log (``serving.audit``).
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from typing import Any

from pydantic import ValidationError

from models.settings import LoomEnv
from serving.audit import AUDIT_FILE_NAME, AuditLog
from serving.config.key_file import KeyFileError, create_key, key_entries, revoke_key
from training.callers import SCOPES


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    keys_cmd = subparsers.add_parser("keys", help="named API keys in $LOOM_HOME/keys.json")
    keys_sub = keys_cmd.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)

    create = keys_sub.add_parser("create", help="make a key; print it once (only its hash is kept)")
    create.add_argument("name", help="the key's name: the principal its calls run as")
    create.add_argument(
        "--scopes",
        required=True,
        help=f"comma-separated, of {', '.join(SCOPES)} (admin holds them all)",
    )
    create.set_defaults(func=run_create)

    listing = keys_sub.add_parser("list", help="the keys' names and scopes (never the keys)")
    listing.set_defaults(func=run_list)

    revoke = keys_sub.add_parser("revoke", help="remove a key (at the server's next start)")
    revoke.add_argument("name", help="the key's name")
    revoke.set_defaults(func=run_revoke)


def run_create(args: argparse.Namespace) -> int:
    env = LoomEnv.from_environ()
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        print(f"error: scopes are {', '.join(SCOPES)}; got {args.scopes!r}", file=sys.stderr)
        return 2
    try:
        key = create_key(env.keys_file, args.name, scopes)
    except (KeyFileError, ValueError) as exc:
        print(f"error: {_first_line(exc)}", file=sys.stderr)
        return 1
    _audit(env, "keys.create", args.name, "created", scopes=scopes)
    print(key)
    print(
        f"loom: key {args.name!r} ({', '.join(scopes)}) created; it is shown this once. "
        "A running server takes it at its next start.",
        file=sys.stderr,
    )
    return 0


def run_list(args: argparse.Namespace) -> int:
    env = LoomEnv.from_environ()
    try:
        entries = key_entries(env.keys_file)
    except KeyFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for entry in entries:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry["created_at"]))
        print(f"{entry['name']}\t{','.join(entry['scopes'])}\t{created}")
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    env = LoomEnv.from_environ()
    try:
        removed = revoke_key(env.keys_file, args.name)
    except KeyFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _audit(env, "keys.revoke", args.name, "revoked" if removed else "absent")
    if not removed:
        print(f"error: no key named {args.name!r}", file=sys.stderr)
        return 1
    print(f"loom: key {args.name!r} revoked; a running server drops it at its next start")
    return 0


def _audit(env: LoomEnv, route: str, name: str, outcome: str, **details: Any) -> None:
    """A line in the server's audit log; the principal is who ran the command on this host."""
    audit = AuditLog(env.home / AUDIT_FILE_NAME)
    audit.record(f"cli:{getpass.getuser()}", route, name, outcome, **details)
    audit.close()


def _first_line(exc: Exception) -> str:
    """What went wrong, without pydantic's echo of the input."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return str(exc)
