"""The ``server:`` section: where the gateway listens, its keys, TLS, body limit, deadline, and
how long and how many clients its HTTP server holds (read timeouts, idle timeout, connection
cap)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

LOOPBACK_HOSTS = frozenset({"localhost"})


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

    host: str = Field("127.0.0.1", description="Address the HTTP server binds.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    api_keys: tuple[str, ...] = Field(
        (),
        description="Bearer keys; when any are set every route but health and metrics needs one.",
    )
    admin_api_keys: tuple[str, ...] = Field(
        (),
        description="Bearer keys that may also use /v1/admin routes (any route, too). With keys "
        "on, an admin route refuses an ordinary key with 403; with no keys at all it is open.",
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

    cors_allow_origins: tuple[str, ...] = Field(
        (),
        description="Web origins (scheme://host[:port], e.g. https://app.example.com) that may "
        "call Loom from a browser: CORS answers for exactly these, and they may call "
        "state-changing routes. Empty (the default): CORS is off, and a request with an Origin "
        "header of another site is refused 403 on POST, PUT, PATCH and DELETE routes. '*' is "
        "refused: list each origin.",
    )

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
        return bool(self.api_keys or self.admin_api_keys)

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
