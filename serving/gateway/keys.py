"""API keys as the gateway holds them: salted sha256 digests, never the keys themselves.

Every key is a principal (``ServerConfig.principal_keys``: ``server.keys``, the older
``api_keys``/``admin_api_keys``, ``LOOM_API_KEYS``, ``$LOOM_HOME/keys.json``) with scopes. The
driver (``loom serve``) hashes each key given in clear with a salt drawn once per process and
hands the gateway a config whose ``server.keys`` hold only ``key_sha256`` digests, so no key is
in the gateway's deployment arguments (Ray's state: Serve's checkpoints in the GCS, the actor
table), its environment or its logs. A request's key is hashed with each salt in use (one per
process, one per keys.json entry: sha256 is fast, and a generated key has 256 random bits, so
a slow hash buys nothing) and compared with ``hmac.compare_digest``, every digest every time.

    hashed = hash_server_keys(config.server)       # the driver: digests only, to the gateway
    keys = KeyCheck.from_digests(hashed)           # the gateway
    keys.identify("a-key")                          # Caller("ci-bot", {"infer"}) or None
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from serving.config.server import ApiKeyConfig, ServerConfig
from training.callers import Caller

SALT_BYTES = 16


def key_digest(key: str, salt: bytes) -> bytes:
    """sha256(salt + key): 32 bytes."""
    return hashlib.sha256(salt + key.encode()).digest()


def digest_text(salt: bytes, digest: bytes) -> str:
    """``key_sha256``'s form: ``SALT:DIGEST`` in hex, or ``DIGEST`` alone without a salt."""
    return f"{salt.hex()}:{digest.hex()}" if salt else digest.hex()


@dataclass(frozen=True)
class Credential:
    """One key's digest under its salt, and who it is."""

    salt: bytes
    digest: bytes
    caller: Caller


@dataclass(frozen=True)
class KeyCheck:
    """The digests of every key, each with its principal and scopes."""

    credentials: tuple[Credential, ...]

    @property
    def on(self) -> bool:
        return bool(self.credentials)

    @classmethod
    def hashing(cls, server: ServerConfig, salt: bytes | None = None) -> KeyCheck:
        """From a config that may hold keys in clear (hashed under a fresh random salt by
        default) as well as digests."""
        salt = os.urandom(SALT_BYTES) if salt is None else salt
        return cls(tuple(_credential(entry, salt) for entry in server.principal_keys()))

    @classmethod
    def from_digests(cls, server: ServerConfig) -> KeyCheck:
        """From a config ``hash_server_keys`` made: digests only. Raises ``ValueError`` for a
        key in clear."""
        entries = server.principal_keys()
        if any(entry.key_sha256 is None for entry in entries):
            raise ValueError("not a key digest: the gateway is given key_sha256 only")
        return cls(tuple(_credential(entry, b"") for entry in entries))

    def identify(self, given: str) -> Caller | None:
        """The caller whose key ``given`` is, or None; in time that does not depend on which
        key matched, or how much of a digest did."""
        digests = {salt: key_digest(given, salt) for salt in {c.salt for c in self.credentials}}
        found = None
        for credential in self.credentials:  # every digest compared, no early exit
            if hmac.compare_digest(digests[credential.salt], credential.digest) and not found:
                found = credential.caller
        return found

    def accepts(self, given: str, *, admin: bool = False) -> bool:
        """Whether ``given`` is a key (an admin key, with ``admin``)."""
        caller = self.identify(given)
        return caller is not None and (caller.is_admin or not admin)


def hash_server_keys(server: ServerConfig, salt: bytes | None = None) -> ServerConfig:
    """A copy of ``server`` whose every key is in ``keys`` as a ``key_sha256`` digest (keys in
    clear salted with one random salt per call by default): what the gateway is given."""
    check = KeyCheck.hashing(server, salt)
    hashed = tuple(
        ApiKeyConfig(
            name=c.caller.principal,
            key_sha256=digest_text(c.salt, c.digest),
            scopes=entry.scopes,
        )
        for c, entry in zip(check.credentials, server.principal_keys(), strict=True)
    )
    return server.model_copy(update={"api_keys": (), "admin_api_keys": (), "keys": hashed})


def _credential(entry: ApiKeyConfig, salt: bytes) -> Credential:
    caller = Caller(entry.name, frozenset(entry.scopes))
    if entry.key is not None:
        return Credential(salt, key_digest(entry.key.strip(), salt), caller)
    assert entry.key_sha256 is not None  # one of the two, by ApiKeyConfig's check
    salt_hex, _, digest_hex = entry.key_sha256.rpartition(":")
    return Credential(bytes.fromhex(salt_hex), bytes.fromhex(digest_hex), caller)
