"""Readiness of the served models, as Ray Serve's controller reports it and the route table says.

The gateway runs in the application ``loom``; each model version runs in its own application
``loom.<model>@<version>`` (``serving.rollout``). A model is ready when it routes to at least
one version and every routed version has a running replica. ``/v1/status`` shows, per model,
the routed versions summed as ``model-<name>`` and every version app of the model (one
starting or draining during a rollout too) under ``versions``. A model whose source does not
resolve in the store yet (the route table's ``waiting``) is ``WAITING`` with the reason in
``waiting_for``; it is not ready, and it does not hold back the server's readiness: the rest
serve while it waits for its first version.

Serve's status is read by ``serving.rollout.serve_status`` (a blocking call to the
controller); it runs in a thread and its answer is cached for ``max_age_s`` so health probes
cost nothing on the hot path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from serving.replicas.deployment import model_deployment_name
from serving.rollout.plan import VersionKey
from serving.rollout.route_table import waiting_by_model
from serving.rollout.serve_status import ServeApp, read_serve_apps
from serving.routing.sharding import SHARD_SEPARATOR, parse_shard_entry

APP_NAME = "loom"

RoutedWeights = Mapping[str, Mapping[str, float]]
"""Model -> version -> weight, as the gateway routes now."""
Waiting = Mapping[str, str]
"""Route-table entry -> why it has no version yet (its source does not resolve)."""

logger = logging.getLogger(__name__)


def _app_entry(app: ServeApp, weight: float) -> dict[str, Any]:
    """One version app: its status, and replicas running in every one of its deployments."""
    deployments = list(app.deployments.values())
    states: dict[str, int] = {}
    for dep in deployments:
        for state, count in dep.replica_states.items():
            states[state] = states.get(state, 0) + count
    messages = [d.message for d in deployments if d.message]
    return {
        "status": app.status,
        "deployment_status": ", ".join(sorted({d.status for d in deployments})) or "-",
        "running_replicas": app.running_replicas,
        "replica_states": states,
        "message": "; ".join(messages) or app.message,
        "weight": weight,
    }


def at_zero(entry: Mapping[str, Any]) -> bool:
    """A version app scaled to zero on purpose (``min_replicas: 0``): running, healthy (its
    target met), no replica in any state. Ready: a request starts one."""
    return (
        entry["status"] == "RUNNING"
        and entry["deployment_status"] == "HEALTHY"
        and entry["running_replicas"] == 0
        and not any(entry["replica_states"].values())
    )


def _model_entry(
    versions: dict[str, dict[str, Any]], routed: Mapping[str, float], waiting_for: str | None
) -> dict[str, Any]:
    serving = [versions[v] for v in routed if v in versions]
    ready = (
        bool(routed)
        and len(serving) == len(routed)
        and all(e["running_replicas"] > 0 or at_zero(e) for e in serving)
    )
    states: dict[str, int] = {}
    for entry in serving:
        for state, count in entry["replica_states"].items():
            states[state] = states.get(state, 0) + count
    statuses = sorted({e["deployment_status"] for e in serving})
    summary: dict[str, Any] = {
        "status": ", ".join(statuses) if serving else "NOT_ROUTED",
        "running_replicas": sum(e["running_replicas"] for e in serving),
        "replica_states": states,
        "message": "; ".join(e["message"] for e in serving if e["message"]),
        "ready": ready,
        "scaled_to_zero": bool(serving) and all(at_zero(e) for e in serving),
        "versions": versions,
    }
    if waiting_for is not None and not routed:
        summary.update(status="WAITING", message=waiting_for, waiting_for=waiting_for)
    return summary


def version_label(entry: str, version: str) -> tuple[str, str]:
    """(model, label) of one version app: a shard's app ``loom.m~2@1`` is model ``m``'s
    ``1~2`` (version 1 of shard 2), so a sharded model is ready when every shard is."""
    parsed = parse_shard_entry(entry)
    return (parsed[0], f"{version}{SHARD_SEPARATOR}{parsed[1]}") if parsed else (entry, version)


def fold_shards(routed: RoutedWeights) -> RoutedWeights:
    """Route weights with each shard entry folded into its model: ``{"m~0": {"1": 1.0}}`` ->
    ``{"m": {"1~0": 1.0}}``."""
    folded: dict[str, dict[str, float]] = {}
    for entry, weights in routed.items():
        for version, weight in weights.items():
            model, label = version_label(entry, version)
            folded.setdefault(model, {})[label] = weight
    return folded


def _snapshot(models: list[str], routed: RoutedWeights, waiting: Waiting) -> dict[str, Any]:
    apps = read_serve_apps()
    gateway_app = apps.get(APP_NAME)
    deployments: dict[str, dict[str, Any]] = {}
    if gateway_app is not None:
        for name, dep in gateway_app.deployments.items():
            deployments[name] = {
                "status": dep.status,
                "running_replicas": dep.running_replicas,
                "replica_states": dict(dep.replica_states),
                "message": dep.message,
            }
    versions: dict[str, dict[str, dict[str, Any]]] = {model: {} for model in models}
    routed = fold_shards(routed)
    for app_name, app in apps.items():
        key = VersionKey.from_app_name(app_name)
        if key is None:
            continue
        model, label = version_label(key.model, key.version)
        if model in versions:
            weight = float(routed.get(model, {}).get(label, 0.0))
            versions[model][label] = _app_entry(app, weight)
    waiting_for = waiting_by_model(waiting)
    for model in models:
        deployments[model_deployment_name(model)] = _model_entry(
            versions[model], routed.get(model, {}), waiting_for.get(model)
        )
    return {
        "application": gateway_app.status if gateway_app else "NOT_STARTED",
        "deployments": deployments,
    }


class ReadinessCache:
    """``routed()`` gives the gateway's current route weights and ``waiting()`` the entries
    whose source does not resolve yet (both read on the event loop)."""

    def __init__(
        self,
        models: list[str],
        routed: Callable[[], RoutedWeights],
        max_age_s: float = 1.0,
        *,
        waiting: Callable[[], Waiting] = dict,
    ) -> None:
        self._models = models
        self._routed = routed
        self._waiting = waiting
        self._max_age_s = max_age_s
        self._snapshot: dict[str, Any] | None = None
        self._taken_s = 0.0
        self._lock = asyncio.Lock()

    async def status(self) -> dict[str, Any]:
        async with self._lock:
            if self._snapshot is None or time.monotonic() - self._taken_s > self._max_age_s:
                routed, waiting = self._routed(), self._waiting()
                self._snapshot = await asyncio.to_thread(_snapshot, self._models, routed, waiting)
                self._taken_s = time.monotonic()
            return self._snapshot

    async def model_ready(self, model: str) -> bool:
        deployments = (await self.status())["deployments"]
        dep = deployments.get(model_deployment_name(model))
        return bool(dep and dep.get("ready"))

    async def without_replicas(self, model: str) -> bool:
        """``model``'s routed versions have no running replica now (scaled to zero and one
        starting, or its one replica being replaced), as of the last status read (at most
        ``max_age_s`` old); False when Serve's status cannot be read (no Serve: a test)."""
        try:
            deployments = (await self.status())["deployments"]
        except Exception as exc:  # the answer is then the plain 504
            logger.debug("Serve's status not read: %s", exc)
            return False
        dep = deployments.get(model_deployment_name(model)) or {}
        return dep.get("running_replicas") == 0 and dep.get("status") != "NOT_ROUTED"

    async def all_ready(self) -> bool:
        """Every model is ready, or waits for its source to resolve (a model configured before
        its first version: the server serves the rest meanwhile, so it is ready)."""
        deployments = (await self.status())["deployments"]
        for model in self._models:
            dep = deployments.get(model_deployment_name(model)) or {}
            if not dep.get("ready") and dep.get("status") != "WAITING":
                return False
        return True
