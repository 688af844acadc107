"""The one reader of Ray Serve's status: ``serve.status()`` as typed values, for the rollout
reconciler (which version apps run) and the gateway's readiness (``/v1/status``).

``read_serve_apps()`` is a blocking call to Serve's controller; callers run it off their event
loop and cache it.

    apps = read_serve_apps()
    apps["loom.minilm@2"].state, apps["loom.minilm@2"].running_replicas
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ray import serve

from serving.rollout.plan import AppState, app_state


def _value(status: object) -> str:
    """Serve's status enums, as their string value."""
    return str(getattr(status, "value", status))


@dataclass(frozen=True, slots=True)
class ServeDeployment:
    """One deployment of an app: its status, replicas per state, and Serve's message."""

    status: str
    replica_states: Mapping[str, int]
    message: str

    @property
    def running_replicas(self) -> int:
        return int(self.replica_states.get("RUNNING", 0))


@dataclass(frozen=True, slots=True)
class ServeApp:
    """One Serve application: its status (``ApplicationStatus`` value), message, deployments."""

    status: str
    message: str
    deployments: Mapping[str, ServeDeployment]

    @property
    def state(self) -> AppState:
        return app_state(self.status)

    @property
    def running_replicas(self) -> int:
        """Replicas running in every one of its deployments (the fewest of them)."""
        return min((d.running_replicas for d in self.deployments.values()), default=0)

    def messages(self) -> str:
        """The app's message and its deployments', joined: why it is not running."""
        parts = [d.message for d in self.deployments.values() if d.message]
        return "; ".join([self.message, *parts] if self.message else parts)


def read_serve_apps() -> dict[str, ServeApp]:
    """Every application Serve has, by name (blocking: a call to the controller)."""
    apps = {}
    for name, app in serve.status().applications.items():
        deployments = {
            dep_name: ServeDeployment(
                status=_value(dep.status),
                replica_states={str(k): int(v) for k, v in dep.replica_states.items()},
                message=dep.message or "",
            )
            for dep_name, dep in app.deployments.items()
        }
        apps[name] = ServeApp(_value(app.status), app.message or "", deployments)
    return apps
