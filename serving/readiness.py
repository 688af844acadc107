"""Readiness of the model deployments, as Ray Serve's controller reports it.

``serve.status()`` is a blocking call to the controller; it runs in a thread and its answer
is cached for ``max_age_s`` so health probes cost nothing on the hot path.
"""

from __future__ import annotations

import asyncio
import time

from ray import serve

APP_NAME = "loom"


def model_deployment_name(model: str) -> str:
    return f"model-{model}"


def _snapshot() -> dict:
    status = serve.status()
    app = status.applications.get(APP_NAME)
    if app is None:
        return {"application": "NOT_STARTED", "deployments": {}}
    deployments = {}
    for name, dep in app.deployments.items():
        running = int(dep.replica_states.get("RUNNING", 0))
        deployments[name] = {
            "status": str(getattr(dep.status, "value", dep.status)),
            "running_replicas": running,
            "replica_states": {str(k): int(v) for k, v in dep.replica_states.items()},
            "message": dep.message,
        }
    return {
        "application": str(getattr(app.status, "value", app.status)),
        "deployments": deployments,
    }


class ReadinessCache:
    def __init__(self, models: list[str], max_age_s: float = 1.0) -> None:
        self._models = models
        self._max_age_s = max_age_s
        self._snapshot: dict | None = None
        self._taken_s = 0.0
        self._lock = asyncio.Lock()

    async def status(self) -> dict:
        async with self._lock:
            if self._snapshot is None or time.monotonic() - self._taken_s > self._max_age_s:
                self._snapshot = await asyncio.to_thread(_snapshot)
                self._taken_s = time.monotonic()
            return self._snapshot

    async def model_ready(self, model: str) -> bool:
        deployments = (await self.status())["deployments"]
        dep = deployments.get(model_deployment_name(model))
        return bool(dep and dep["running_replicas"] > 0)

    async def all_ready(self) -> bool:
        return all([await self.model_ready(m) for m in self._models])
