"""Scrape targets in Prometheus's HTTP service-discovery format (``GET /v1/admin/targets``):
every monitoring sidecar and the gateway, each group labelled with its ``job`` and node.

    http_sd(gateway="127.0.0.1:8000", sidecars=[{"address": "127.0.0.1:9470", "node": "a1"}])
    # [{"targets": ["127.0.0.1:8000"], "labels": {"job": "loom-gateway"}},
    #  {"targets": ["127.0.0.1:9470"], "labels": {"job": "loom-sidecar", "node": "a1"}}]

``sidecar_targets`` reads such an answer back (``loom top``, ``serving.monitoring.scrape``).
A sidecar that does not answer (restarting, hung) stays listed at its last address, so
Prometheus shows it down (``up == 0``) rather than losing the target; its replicas keep
serving either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ScrapeTarget:
    """A sidecar to scrape, from the gateway's HTTP service discovery answer."""

    url: str
    node: str


def sidecar_targets(answer: object) -> list[ScrapeTarget]:
    """The ``loom-sidecar`` targets of a Prometheus HTTP service discovery answer:
    ``[{"targets": ["host:port"], "labels": {"job": "loom-sidecar", "node": "n1"}}, ...]``.
    Scheme and path follow Prometheus' ``__scheme__`` and ``__metrics_path__`` labels
    (``http``, ``/metrics``). Raises ValueError on another shape."""
    if not isinstance(answer, list):
        raise ValueError("service discovery answer is not a list of target groups")
    targets = []
    for group in answer:
        if not isinstance(group, dict) or not isinstance(group.get("targets"), list):
            raise ValueError("a target group without a list of targets")
        labels = group.get("labels", {})
        if not isinstance(labels, dict):
            raise ValueError("a target group whose labels are not an object")
        if labels.get("job") != SIDECAR_JOB:
            continue  # the gateway's own target
        scheme = str(labels.get("__scheme__", "http"))
        path = str(labels.get("__metrics_path__", "/metrics"))
        node = str(labels.get("node", ""))
        targets += [ScrapeTarget(f"{scheme}://{host}{path}", node) for host in group["targets"]]
    return targets
