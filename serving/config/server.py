"""The ``server:`` section: where the gateway listens, its keys, body limit, deadline, and how
long and how many clients its HTTP server holds (read timeouts, idle timeout, connection cap)."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

LOOPBACK_HOSTS = frozenset({"localhost"})


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

    @property
    def keys_on(self) -> bool:
        """True when any route but health and metrics needs a key."""
        return bool(self.api_keys or self.admin_api_keys)

    @property
    def is_loopback(self) -> bool:
        if self.host in LOOPBACK_HOSTS:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
