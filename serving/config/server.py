"""The ``server:`` section: where the gateway listens, its keys, TLS, body limit, deadline, and
how long and how many clients its HTTP server holds (read timeouts, idle timeout, connection
cap)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.config.rate_limits import RateLimitsConfig
from training.callers import PRINCIPAL_PATTERN, ScopeName

LOOPBACK_HOSTS = frozenset({"localhost"})
MIN_KEY_CHARS = 16
"""A key shorter than this is refused (config, ``LOOM_API_KEYS``, ``loom keys create``)."""
LEGACY_KEY_SCOPES: tuple[ScopeName, ...] = ("infer", "jobs", "models")
"""What a key of ``api_keys`` (or ``LOOM_API_KEYS``) may do; an ``admin_api_keys`` key: all."""


def check_key_length(key: str) -> str:
    """``key`` unchanged, or ``ValueError`` when it is too short to be a secret."""
    if len(key.strip()) < MIN_KEY_CHARS:
        raise ValueError(f"an API key must have at least {MIN_KEY_CHARS} characters")
    return key


class ApiKeyConfig(BaseModel):
    """One entry of ``server.keys``: a named key (the principal) and what it may do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        description="The principal: who the key's calls are logged, counted and audited as, "
        "and the owner of the jobs it submits. 1-64 letters, digits, '.', '_', '-'."
    )
    key: str | None = Field(
        None,
        description="The key itself (at least 16 characters); or give key_sha256 instead.",
        repr=False,
    )
    key_sha256: str | None = Field(
        None,
        description="The key's sha256 as 64 hex digits (sha256 of the key alone), or "
        "SALT:DIGEST in hex (sha256 of the salt's bytes then the key's), as keys.json holds "
        "it: the config then holds no key.",
    )
    scopes: tuple[ScopeName, ...] = Field(
        description="What the key may call: infer, jobs, models (promote; register a job "
        "under a served name), admin (every route and every caller's jobs)."
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not PRINCIPAL_PATTERN.fullmatch(name):
            raise ValueError("a key's name is 1-64 letters, digits, '.', '_' or '-'")
        return name

    @field_validator("key")
    @classmethod
    def _long_enough(cls, key: str | None) -> str | None:
        return None if key is None else check_key_length(key)

    @field_validator("key_sha256")
    @classmethod
    def _a_digest(cls, text: str | None) -> str | None:
        if text is None:
            return None
        salt, _, digest = text.rpartition(":")
        try:
            bytes.fromhex(salt), bytes.fromhex(digest)
        except ValueError:
            salt = "-"
        if salt == "-" or len(digest) != 64 or (":" in text and not salt):
            raise ValueError("key_sha256 is 64 hex digits, or SALT:DIGEST in hex")
        return text.lower()

    @model_validator(mode="after")
    def _one_key(self) -> ApiKeyConfig:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of key and key_sha256")
        if not self.scopes:
            raise ValueError("a key needs at least one scope")
        return self


class TlsConfig(BaseModel):
    """``server.tls``: the gateway serves HTTPS (TLS 1.2 or later) with this certificate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    certfile: str = Field(
        description="PEM file with the server's certificate (and any intermediates after it); "
        "read on the node the gateway runs on."
    )
    keyfile: str = Field(
        description="PEM file with the certificate's private key (unencrypted); read on the "
        "node the gateway runs on."
    )

    @field_validator("certfile", "keyfile")
    @classmethod
    def _readable(cls, value: str) -> str:
        path = Path(value).expanduser()
        if not path.is_file() or not os.access(path, os.R_OK):
            raise ValueError(f"{value} is not a readable file")
        return str(path)


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(
        "127.0.0.1", description="Address the HTTP server (and the gRPC one, with grpc_port) binds."
    )
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    grpc_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port of the Open Inference Protocol over gRPC (inference."
        "GRPCInferenceService, what tritonclient.grpc calls), served by each gateway replica "
        "on host beside HTTP, with the same keys, limits and routing (and TLS with tls). null "
        "(the default): no gRPC server.",
    )
    api_keys: tuple[str, ...] = Field(
        (),
        description="Bearer keys (at least 16 characters each); when any are set every route "
        "but health and metrics needs one. Kept for older configs: each is a principal "
        "api-key-N (N from 1, in order) with scopes infer, jobs, models.",
    )
    admin_api_keys: tuple[str, ...] = Field(
        (),
        description="Bearer keys (at least 16 characters each) that may call every route: each "
        "is a principal admin-key-N with the admin scope. With keys on, a route refuses a key "
        "without its scope with 403; with no keys at all every route is open (to 127.0.0.1).",
    )
    keys: tuple[ApiKeyConfig, ...] = Field(
        (),
        description="Named keys, each {name, key or key_sha256, scopes}: the principal a "
        "request runs as and what it may call (docs/security.md#keys-and-scopes). They add to "
        "api_keys, admin_api_keys, LOOM_API_KEYS and $LOOM_HOME/keys.json.",
    )
    tls: TlsConfig | None = Field(
        None,
        description="certfile and keyfile (PEM): the gateway serves HTTPS (TLS 1.2 or later), "
        "under either ingress. null: plain HTTP, fit for 127.0.0.1 only (a warning at start "
        "otherwise: keys and data would cross the network in clear).",
    )
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="Requests with a larger body are refused with 413."
    )
    ingress: Literal["direct", "proxy"] = Field(
        "direct",
        description="direct: the gateway replica serves HTTP itself (no proxy hop, none of "
        "Serve's per-request ingress layers); proxy: through Ray Serve's HTTP proxy.",
    )
    request_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Deadline of one request, carried to the replica; past it the answer is "
        "504 and what the replica had not started is not computed.",
    )

    header_read_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A request's line and headers must arrive within this many seconds of its "
        "first byte; else 408 and the connection is closed. The key is in the headers, so this "
        "bounds what a client without one can hold.",
    )
    body_read_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A request's whole body must arrive within this many seconds of its "
        "headers (a deadline, not a per-chunk timeout: a body trickled a byte at a time is cut "
        "too); else 408 and the connection is closed.",
    )
    idle_timeout_s: int = Field(
        15,
        ge=1,
        description="A connection with no request under way (just opened, or kept alive after "
        "an answer) is closed after this many whole seconds.",
    )
    max_connections: int = Field(
        1000,
        ge=1,
        description="Open connections the HTTP server serves at once. One more is answered 503 "
        "(with Retry-After) as soon as its headers arrive and closed, never reaching a route; "
        "it waits at most header_read_timeout_s for them.",
    )
    max_header_bytes: int = Field(
        65536,
        ge=1024,
        description="A request line and headers larger than this are refused with 431 and the "
        "connection closed.",
    )

    gateway_replicas: int = Field(
        1,
        ge=1,
        description="Gateway replicas, each serving host:port on its own node. More than one "
        "needs gateway_node_resource, so no two land on one node (one port each).",
    )
    gateway_node_resource: str | None = Field(
        None,
        min_length=1,
        description="A Ray resource each gateway replica takes one of: a node offering one "
        "holds one gateway (Kubernetes: the gateway pods offer loom_gateway). null: anywhere.",
    )

    rate_limits: RateLimitsConfig = Field(
        default_factory=RateLimitsConfig,
        description="Requests per second per client and route family, a token bucket each "
        "({infer: {rate_per_s, burst}, jobs: {...}}); a client is its key's principal, or its "
        "address (no key, or a key nobody holds). Past it: 429 with Retry-After. Off by default.",
    )
    cors_allow_origins: tuple[str, ...] = Field(
        (),
        description="Web origins (scheme://host[:port], e.g. https://app.example.com) that may "
        "call Loom from a browser: CORS answers for exactly these, and they may call "
        "state-changing routes. Empty (the default): CORS is off, and a request with an Origin "
        "header of another site is refused 403 on POST, PUT, PATCH and DELETE routes. '*' is "
        "refused: list each origin.",
    )

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _keys_long_enough(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        for key in keys:
            check_key_length(key)
        return keys

    @model_validator(mode="after")
    def _one_gateway_per_node(self) -> ServerConfig:
        if self.gateway_replicas > 1 and self.gateway_node_resource is None:
            raise ValueError(
                "gateway_replicas > 1 needs gateway_node_resource: two gateways on one node "
                "would both bind its port"
            )
        return self

    @model_validator(mode="after")
    def _grpc_port_is_its_own(self) -> ServerConfig:
        if self.grpc_port is not None and self.grpc_port == self.port:
            raise ValueError(
                f"grpc_port and port are both {self.port}: give gRPC a port of its own"
            )
        return self

    @model_validator(mode="after")
    def _names_unique(self) -> ServerConfig:
        names = [entry.name for entry in self.principal_keys()]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"key names must be unique: {', '.join(repeated)} repeated")
        return self

    def principal_keys(self) -> tuple[ApiKeyConfig, ...]:
        """Every key as a named entry: ``keys``, then ``api_keys`` as ``api-key-1, 2, ...``
        (scopes infer, jobs, models) and ``admin_api_keys`` as ``admin-key-1, 2, ...``
        (admin)."""
        legacy = tuple(
            ApiKeyConfig(name=f"api-key-{n}", key=key, scopes=LEGACY_KEY_SCOPES)
            for n, key in enumerate(self.api_keys, 1)
        )
        admin = tuple(
            ApiKeyConfig(name=f"admin-key-{n}", key=key, scopes=("admin",))
            for n, key in enumerate(self.admin_api_keys, 1)
        )
        return (*self.keys, *legacy, *admin)

    @field_validator("cors_allow_origins")
    @classmethod
    def _origins_are_origins(cls, origins: tuple[str, ...]) -> tuple[str, ...]:
        for origin in origins:
            scheme, sep, rest = origin.partition("://")
            bad = not sep or not rest or any(c in rest for c in "/?#@* ")
            if scheme not in ("http", "https") or bad:
                raise ValueError(
                    f"{origin!r} is not an origin: write scheme://host[:port] ('*' is not "
                    "allowed), e.g. https://app.example.com"
                )
        return origins

    @property
    def keys_on(self) -> bool:
        """True when any route but health and metrics needs a key."""
        return bool(self.api_keys or self.admin_api_keys or self.keys)

    @property
    def listen_ports(self) -> tuple[int, ...]:
        """Every port a gateway replica binds on ``host``: HTTP, then gRPC when set."""
        return (self.port,) if self.grpc_port is None else (self.port, self.grpc_port)

    @property
    def scheme(self) -> str:
        """``https`` with ``tls`` set, else ``http``."""
        return "https" if self.tls is not None else "http"

    @property
    def is_loopback(self) -> bool:
        if self.host in LOOPBACK_HOSTS:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
