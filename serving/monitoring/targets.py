"""Scrape targets in Prometheus's HTTP service-discovery format (``GET /v1/admin/targets``):
every monitoring sidecar and the gateway, each group labelled with its ``job`` and node.

    http_sd(gateway="127.0.0.1:8000", sidecars=[{"address": "127.0.0.1:9470", "node": "a1"}])
    # [{"targets": ["127.0.0.1:8000"], "labels": {"job": "loom-gateway"}},
    #  {"targets": ["127.0.0.1:9470"], "labels": {"job": "loom-sidecar", "node": "a1"}}]

A sidecar that does not answer (restarting, hung) stays listed at its last address, so
Prometheus shows it down (``up == 0``) rather than losing the target; its replicas keep
serving either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import BaseModel, Field, RootModel

GATEWAY_JOB = "loom-gateway"
SIDECAR_JOB = "loom-sidecar"


class TargetGroup(BaseModel):
    targets: list[str] = Field(description="host:port of each target in the group.")
    labels: dict[str, str] = Field(
        description="Labels Prometheus gives every series scraped from the group (job, node; "
        "__scheme__ https where the gateway serves TLS)."
    )


class TargetGroups(RootModel[list[TargetGroup]]):
    """Prometheus ``http_sd_configs``' answer: a list of target groups."""


def http_sd(
    *, gateway: str | None, sidecars: Sequence[Mapping[str, str]], tls: bool = False
) -> list[dict[str, object]]:
    groups: list[dict[str, object]] = []
    if gateway is not None:
        labels = {"job": GATEWAY_JOB}
        if tls:
            labels["__scheme__"] = "https"
        groups.append({"targets": [gateway], "labels": labels})
    for sidecar in sorted(sidecars, key=lambda s: s["address"]):
        groups.append(
            {
                "targets": [sidecar["address"]],
                "labels": {"job": SIDECAR_JOB, "node": sidecar.get("node", "")},
            }
        )
    return groups


def advertised(host: str, port: int, node_ip: str) -> str:
    """The address others reach a listener on: the node's for one on every address."""
    if host in ("0.0.0.0", "::", ""):
        host = node_ip
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
