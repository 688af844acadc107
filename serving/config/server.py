"""The ``server:`` section: where the gateway listens, its keys, body limit and deadline."""

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
