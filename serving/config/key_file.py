"""The key file, ``$LOOM_HOME/keys.json``: named keys that ``loom keys create`` made.

It holds no key, only each key's salted sha256 (``key_sha256`` as ``SALT:DIGEST``, a 16-byte
salt of its own), its name and its scopes; the key itself is printed once at creation. Keys
are 32 random bytes (``secrets.token_urlsafe``), so a fast salted hash is as good as a slow
one: nothing is left to guess. ``loom serve`` reads the file at start (a key created or revoked
later takes effect at the next start).

    key = create_key(path, "ci-bot", ("infer", "jobs"))   # printed once, never stored
    [entry.name for entry in read_key_file(path)]          # ["ci-bot"]
    revoke_key(path, "ci-bot")                            # True
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from serving.config.server import ApiKeyConfig

SALT_BYTES = 16
KEY_BYTES = 32


class KeyFileError(Exception):
    """The file cannot be read or written, or the request contradicts it."""


def read_key_file(path: Path) -> tuple[ApiKeyConfig, ...]:
    """The file's keys; none when it does not exist."""
    return tuple(ApiKeyConfig.model_validate(_entry_config(e)) for e in _read(path))


def key_entries(path: Path) -> list[dict[str, Any]]:
    """Each key's name, scopes and creation time (what ``loom keys list`` shows)."""
    return [{k: e[k] for k in ("name", "scopes", "created_at")} for e in _read(path)]


def create_key(path: Path, name: str, scopes: Sequence[str]) -> str:
    """A new random key named ``name`` with ``scopes``, stored as its salted hash; the key is
    returned once. ``KeyFileError`` when the name is taken; ``ValueError`` for a bad name or
    scope (``ApiKeyConfig``'s rules)."""
    entries = _read(path)
    if any(e["name"] == name for e in entries):
        raise KeyFileError(f"a key named {name!r} exists; revoke it first")
    key = secrets.token_urlsafe(KEY_BYTES)
    salt = os.urandom(SALT_BYTES)
    digest = hashlib.sha256(salt + key.encode()).hexdigest()
    entry = {
        "name": name,
        "key_sha256": f"{salt.hex()}:{digest}",
        "scopes": list(dict.fromkeys(scopes)),
        "created_at": time.time(),
    }
    ApiKeyConfig.model_validate(_entry_config(entry))  # raises on a bad name or scope
    _write(path, [*entries, entry])
    return key


def revoke_key(path: Path, name: str) -> bool:
    """Remove the key named ``name``; False when there is none."""
    entries = _read(path)
    kept = [e for e in entries if e["name"] != name]
    if len(kept) == len(entries):
        return False
    _write(path, kept)
    return True


def _entry_config(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry[k] for k in ("name", "key_sha256", "scopes")}


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read {path}: {exc}") from None
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list) or not all(isinstance(e, dict) for e in keys):
        raise KeyFileError(f"{path} is not a Loom key file ({{'keys': [...]}})")
    return keys


def _write(path: Path, entries: list[dict[str, Any]]) -> None:
    """Atomically, readable by its owner only (it lets a guesser test keys offline)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        json.dump({"keys": entries}, file, indent=2)
    os.replace(staged, path)
