"""API keys as the gateway holds them: salted sha256 digests, never the keys themselves.

The driver (``loom serve``) hashes the configured keys with a salt drawn once per process and
hands the gateway a config whose ``api_keys``/``admin_api_keys`` hold only the digests'
text, so no key is in the gateway's deployment arguments (Ray's state: Serve's checkpoints
in the GCS, the actor table), its environment or its logs. A request's key is hashed with the
same salt and compared with ``hmac.compare_digest``.

    hashed = hash_server_keys(config.server)       # the driver: digests only, to the gateway
    keys = KeyCheck.from_digests(hashed)           # the gateway
    keys.accepts("a-key"), keys.accepts("a-key", admin=True)
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from serving.config.server import ServerConfig

DIGEST_SCHEME = "sha256"
SALT_BYTES = 16


def key_digest(key: str, salt: bytes) -> bytes:
    """sha256(salt + key): 32 bytes."""
    return hashlib.sha256(salt + key.encode()).digest()


@dataclass(frozen=True)
class KeyCheck:
    """The digests of the ordinary and the admin keys, under one salt. An admin key may call
    every route, so it is among ``keys`` too."""

    salt: bytes
    keys: tuple[bytes, ...]
    admin_keys: tuple[bytes, ...]

    @property
    def on(self) -> bool:
        return bool(self.keys)

    @classmethod
    def hashing(cls, server: ServerConfig, salt: bytes | None = None) -> KeyCheck:
        """From a config that holds the keys themselves (a fresh random salt by default)."""
        salt = os.urandom(SALT_BYTES) if salt is None else salt
        admin = tuple(key_digest(k, salt) for k in server.admin_api_keys)
        ordinary = tuple(key_digest(k, salt) for k in server.api_keys)
        return cls(salt, ordinary + admin, admin)

    @classmethod
    def from_digests(cls, server: ServerConfig) -> KeyCheck:
        """From a config ``hash_server_keys`` made: each key is ``sha256:<salt>:<digest>``
        (hex). Raises ``ValueError`` for anything else, or for two salts."""
        parsed = [_parse(t) for t in (*server.api_keys, *server.admin_api_keys)]
        salts = {salt for salt, _ in parsed}
        if len(salts) > 1:
            raise ValueError("key digests under more than one salt")
        salt = salts.pop() if salts else b""
        admin = tuple(_parse(t)[1] for t in server.admin_api_keys)
        return cls(salt, tuple(digest for _, digest in parsed), admin)

    def accepts(self, given: str, *, admin: bool = False) -> bool:
        """Whether ``given`` is one of the keys (of the admin keys with ``admin``), in time
        that does not depend on how much of a digest matched."""
        digest = key_digest(given, self.salt)
        wanted = self.admin_keys if admin else self.keys
        # every digest compared, no early exit: the time says nothing of which key matched
        found = [hmac.compare_digest(digest, candidate) for candidate in wanted]
        return any(found)


def hash_server_keys(server: ServerConfig, salt: bytes | None = None) -> ServerConfig:
    """A copy of ``server`` whose keys are replaced by their digests' text (one random salt
    per call by default): what the gateway deployment is given."""
    check = KeyCheck.hashing(server, salt)
    admin_count = len(server.admin_api_keys)
    ordinary = check.keys[: len(check.keys) - admin_count]
    return server.model_copy(
        update={
            "api_keys": tuple(_text(check.salt, d) for d in ordinary),
            "admin_api_keys": tuple(_text(check.salt, d) for d in check.admin_keys),
        }
    )


def _text(salt: bytes, digest: bytes) -> str:
    return f"{DIGEST_SCHEME}:{salt.hex()}:{digest.hex()}"


def _parse(text: str) -> tuple[bytes, bytes]:
    scheme, _, rest = text.partition(":")
    salt_hex, _, digest_hex = rest.partition(":")
    try:
        salt, digest = bytes.fromhex(salt_hex), bytes.fromhex(digest_hex)
    except ValueError:
        salt, digest = b"", b""
    if scheme != DIGEST_SCHEME or not salt or len(digest) != hashlib.sha256().digest_size:
        raise ValueError("not a key digest (sha256:<salt hex>:<digest hex>)")
    return salt, digest
