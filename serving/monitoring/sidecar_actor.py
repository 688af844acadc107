"""The sidecar on a local Ray cluster: a detached actor pinned to its node, one per node and
stats folder, started by the node's first replica and restarted by Ray when it dies.

A replica calls ``report_to_sidecar(stats, settings)`` in its constructor: it starts the
replica's stats file and makes sure its node has a sidecar (``get_if_exists``: the first
replica on a node creates it, the rest find it; nobody waits for it). Ray restarts a sidecar
that dies (``max_restarts=-1``) on the same node; until it is back its scrape target is
down, and the replicas never notice. ``list_sidecars`` is what the gateway's
``/v1/admin/targets`` lists; ``stop_sidecars`` ends them with the server.

On Kubernetes the sidecar is a container of the worker pod instead (``deploy/``), and
``settings.start_actor`` is off: each node that can run replicas has one at its own address
and the configured port (``node_sidecars``, ``NodeSidecars``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from serving.monitoring.sidecar import Sidecar, SidecarSettings
from serving.monitoring.stats import INTERVAL_S, ReplicaStats, StatsReporter

logger = logging.getLogger(__name__)

NAMESPACE = "loom"
PREFIX = "loom-sidecar-"
ADDRESS_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class ReplicaMonitoring:
    """What a replica needs to report: where its stats file goes and the sidecar's address."""

    stats_dir: str
    sidecar_host: str = "127.0.0.1"
    sidecar_port: int = 0
    interval_s: float = INTERVAL_S
    start_actor: bool = True
    """Start a sidecar actor on the node (off where the sidecar is a container)."""


class SidecarActor:
    """A ``Sidecar`` in a Ray actor; ``address()`` answers where Prometheus finds it."""

    def __init__(self, stats_dir: str, host: str, port: int, node: str) -> None:
        self.sidecar = Sidecar(
            SidecarSettings(stats_dir=Path(stats_dir), host=host, port=port, node=node)
        )
        self.sidecar.start()
        self.node = node

    def address(self) -> dict[str, str]:
        host = self.sidecar.settings.host
        if host in ("0.0.0.0", "::", ""):  # listening everywhere: advertise the node's address
            host = ray.util.get_node_ip_address()
        return {"address": f"{host}:{self.sidecar.port}", "node": self.node}

    def pid(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        self.sidecar.stop()


def sidecar_name(node_id: str, stats_dir: str) -> str:
    """One sidecar per node and stats folder: two Loom homes on one node get one each."""
    folder = hashlib.sha256(stats_dir.encode()).hexdigest()[:8]
    return f"{PREFIX}{node_id[:16]}-{folder}"


def ensure_sidecar(settings: ReplicaMonitoring) -> Any:
    """This node's sidecar for ``settings.stats_dir``, created if there is none (not waited
    for: a sidecar that fails to start is a target down, never a replica failure)."""
    node_id = ray.get_runtime_context().get_node_id()
    actor = ray.remote(SidecarActor).options(
        name=sidecar_name(node_id, settings.stats_dir),
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        num_cpus=0,
        max_restarts=-1,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    )
    return actor.remote(
        settings.stats_dir, settings.sidecar_host, settings.sidecar_port, node_id[:16]
    )


def report_to_sidecar(
    stats: ReplicaStats, settings: ReplicaMonitoring | None
) -> StatsReporter | None:
    """Start writing ``stats`` where the node's sidecar reads them, and make sure the node has
    one. None without ``settings`` (a replica built outside a server: tests, benchmarks)."""
    if settings is None:
        return None
    reporter = StatsReporter(stats, Path(settings.stats_dir), interval_s=settings.interval_s)
    if settings.start_actor and ray.is_initialized():
        try:
            ensure_sidecar(settings)
        except Exception as exc:  # the replica serves without a sidecar: a target down
            logger.warning("no monitoring sidecar on this node: %s", exc)
    return reporter


def _named_sidecars(stats_dir: str | None = None) -> list[str]:
    """The sidecar actors' names; with ``stats_dir``, only those reading that folder (one
    server's, where several share a Ray)."""
    names = [
        entry["name"]
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry.get("namespace") == NAMESPACE and str(entry.get("name", "")).startswith(PREFIX)
    ]
    if stats_dir is None:
        return names
    suffix = sidecar_name("", stats_dir).removeprefix(PREFIX)
    return [name for name in names if name.endswith(suffix)]


async def list_sidecars(stats_dir: str | None = None) -> list[dict[str, str]]:
    """Every sidecar that answers within ``ADDRESS_TIMEOUT_S``: ``{"address", "node",
    "name"}``; with ``stats_dir``, only the ones reading that folder (this server's)."""
    names = await asyncio.to_thread(_named_sidecars, stats_dir)

    async def address(name: str) -> dict[str, str] | None:
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
            found: dict[str, str] = await asyncio.wait_for(
                actor.address.remote(), ADDRESS_TIMEOUT_S
            )
        except Exception as exc:  # restarting, or its node is gone
            logger.info("sidecar %s did not answer: %s", name, exc)
            return None
        return {**found, "name": name}

    answers = await asyncio.gather(*(address(name) for name in names))
    return [a for a in answers if a is not None]


class KnownSidecars:
    """The gateway's list of sidecars for ``GET /v1/admin/targets``: every sidecar actor that
    exists, at the address it last answered with. One that does not answer now (restarting,
    or hung) keeps its last address, so Prometheus sees that target down rather than losing
    it; one whose actor is gone (its node left) is dropped."""

    def __init__(self, stats_dir: str | None) -> None:
        self.stats_dir = stats_dir
        self._known: dict[str, dict[str, str]] = {}

    async def __call__(self) -> list[dict[str, str]]:
        for found in await list_sidecars(self.stats_dir):
            self._known[found["name"]] = found
        names = set(await asyncio.to_thread(_named_sidecars, self.stats_dir))
        self._known = {name: v for name, v in self._known.items() if name in names}
        return list(self._known.values())


def node_sidecars(port: int) -> list[dict[str, str]]:
    """Sidecars that run as containers beside the Ray nodes (Kubernetes): one per alive node
    that offers CPUs or GPUs to replicas, at the node's address and ``port``, as
    ``list_sidecars`` answers them. A head or gateway pod (``num-cpus: 0``) runs no replica
    and has no sidecar."""
    found = []
    for node in ray.nodes():
        resources = node.get("Resources", {})
        if not node.get("Alive") or not (resources.get("CPU", 0) or resources.get("GPU", 0)):
            continue
        node_id = str(node["NodeID"])[:16]
        address = f"{node['NodeManagerAddress']}:{port}"
        found.append({"address": address, "node": node_id, "name": f"{PREFIX}{node_id}"})
    return found


class NodeSidecars:
    """The gateway's list of sidecar containers for ``GET /v1/admin/targets``: every node's
    (``node_sidecars``); a node that left is dropped. While Ray's node table cannot be read
    (the GCS restarting) the last list stands, as ``KnownSidecars`` keeps its targets."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._known: list[dict[str, str]] = []

    async def __call__(self) -> list[dict[str, str]]:
        try:
            self._known = await asyncio.to_thread(node_sidecars, self.port)
        except Exception as exc:  # the targets answer what was last known
            logger.warning("Ray's node table not read, sidecar targets unchanged: %s", exc)
        return list(self._known)


def stop_sidecars(stats_dir: str) -> int:
    """End this server's sidecars (no restart); how many there were."""
    stopped = 0
    for name in _named_sidecars(stats_dir):
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            stopped += 1
        except ValueError:  # gone already
            continue
    return stopped


def sidecar_addresses(stats_dir: str | None = None) -> list[str]:
    """``list_sidecars`` from code outside an event loop (the autoscaling policy's poller
    thread): every answering sidecar's ``host:port``."""
    addresses: list[str] = []
    for name in _named_sidecars(stats_dir):
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
            found = cast(dict[str, str], ray.get(actor.address.remote(), timeout=ADDRESS_TIMEOUT_S))
        except Exception as exc:  # restarting, or its node is gone
            logger.info("sidecar %s did not answer: %s", name, exc)
            continue
        addresses.append(str(found["address"]))
    return addresses
