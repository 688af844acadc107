"""The ``ray:`` section: how ``loom serve`` starts its local Ray head. Today one setting, the
Redis that makes the head's GCS fault tolerant.

    config.ray.gcs_redis_address             # "redis://127.0.0.1:6379", or None
    config.ray.gcs_redis().host              # "127.0.0.1"
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

REDIS_SCHEMES = {"redis": False, "rediss": True}
"""URL scheme -> whether the connection uses TLS (Ray's own reading of the address)."""


@dataclass(frozen=True, kw_only=True)
class RedisAddress:
    """Where a Redis listens: ``redis://host:port``, ``rediss://host:port`` (TLS) or
    ``host:port``."""

    host: str
    port: int
    tls: bool = False

    def url(self) -> str:
        """The form Ray takes in ``RAY_REDIS_ADDRESS``."""
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}"


def parse_redis_address(text: str) -> RedisAddress:
    """``redis://127.0.0.1:6379`` -> RedisAddress(host='127.0.0.1', port=6379, tls=False).
    Raises ValueError naming what is wrong: no port, a port out of range, another scheme, a
    password or a path (Ray's GCS takes none of them in the address)."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "redis", text
    if scheme not in REDIS_SCHEMES:
        raise ValueError(f"scheme must be redis:// or rediss://, not {scheme}://")
    if "@" in rest or "/" in rest:
        raise ValueError("give host:port only (no user, password or database)")
    host, colon, port_text = rest.rpartition(":")
    if not colon or not host or not port_text.isdigit():
        raise ValueError(f"expected host:port, got {rest!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    return RedisAddress(host=host.strip("[]"), port=port, tls=REDIS_SCHEMES[scheme])


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    gcs_redis_address: str | None = Field(
        None,
        description="Redis that keeps the GCS state of the Ray head `loom serve` starts "
        "(`redis://host:port`, `rediss://host:port` for TLS, or `host:port`; no password). "
        "Set: GCS fault tolerance, in a namespace of the server's own (one per home and "
        "port), with the GCS process restarted by `loom serve` when it dies, and the "
        "namespace's keys removed on a clean stop. null: the GCS keeps its state in memory, "
        "and its loss ends the server. Ignored when Loom joins a Ray already running.",
    )

    @field_validator("gcs_redis_address")
    @classmethod
    def _parses(cls, value: str | None) -> str | None:
        if value is not None:
            parse_redis_address(value)  # its ValueError names the fault
        return value

    def gcs_redis(self) -> RedisAddress | None:
        """The parsed ``gcs_redis_address``; None when GCS fault tolerance is off."""
        if self.gcs_redis_address is None:
            return None
        return parse_redis_address(self.gcs_redis_address)


SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
"""Ray Serve settings every Ray process of a Loom cluster runs with (read at process start:
the environment of a local Ray `loom serve` starts, and of every pod on Kubernetes); why
each: ``serving.server.ray_serve_env``."""


def joins_a_cluster(environ: Mapping[str, str] = os.environ) -> bool:
    """``RAY_ADDRESS`` names a running Ray cluster for `loom serve` to join (its own head is
    then not started; a second `loom serve` joins the first's cluster this way)."""
    return bool(environ.get("RAY_ADDRESS"))
