"""Fakes of Serve's version apps, the store and the route board, for the reconciler's tests
(rollout) and the tests of what deploys through it (pools, sharding)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.errors import ModelNotFound
from serving.config import DeployedEntry
from serving.rollout.plan import AppState, GatewayReport, VersionKey
from serving.rollout.reconciler import AppStatus, Reconciler
from serving.rollout.route_table import VersionRoute


class FakeApps:
    """Serve's version apps: deploy makes DEPLOYING, tests flip states by hand."""

    def __init__(self) -> None:
        self.apps: dict[VersionKey, AppStatus] = {}
        self.log: list[str] = []

    def states(self) -> dict[VersionKey, AppStatus]:
        return dict(self.apps)

    def deploy(self, key: VersionKey) -> None:
        self.log.append(f"deploy {key.app_name}")
        self.apps[key] = AppStatus(AppState.DEPLOYING)

    def delete(self, key: VersionKey) -> None:
        self.log.append(f"delete {key.app_name}")
        self.apps[key] = AppStatus(AppState.DELETING)

    def handle(self, key: VersionKey) -> str:
        return f"handle:{key.app_name}"

    def set(self, model: str, version: str, state: AppState, message: str = "") -> None:
        self.apps[VersionKey(model, version)] = AppStatus(state, message)


class FakeBoard:
    """The board: one gateway that acknowledges each table at once unless told to lag."""

    def __init__(self, apps: FakeApps) -> None:
        self.apps = apps
        self.epoch = 0
        self.tables: list[dict[str, tuple[VersionRoute, ...]]] = []
        self.gateway_busy: dict[str, int] = {}
        self.gateway_lags = False
        self.shard_counts: dict[str, int] = {}
        self.waiting: list[dict[str, str]] = []
        """The ``waiting`` of each table published, beside ``tables``."""

    def publish(
        self,
        routes: Mapping[str, tuple[VersionRoute, ...]],
        *,
        waiting: Mapping[str, str] | None = None,
    ) -> int:
        self.epoch += 1
        self.tables.append(dict(routes))
        self.waiting.append(dict(waiting or {}))
        self.apps.log.append(f"publish {self.describe(routes)}")
        return self.epoch

    def reports(self) -> dict[str, GatewayReport]:
        epoch = self.epoch - 1 if self.gateway_lags else self.epoch
        return {"g1": GatewayReport(epoch=epoch, busy=dict(self.gateway_busy), age_s=0.1)}

    def shard_requests(self) -> dict[str, int]:
        return dict(self.shard_counts)

    @staticmethod
    def describe(routes: Mapping[str, tuple[VersionRoute, ...]]) -> str:
        return " ".join(
            f"{m}=" + ",".join(f"{r.version}x{r.weight:g}" for r in rs)
            for m, rs in sorted(routes.items())
        )


class Store:
    def __init__(self, **aliases: str) -> None:
        self.aliases = aliases

    def resolve(self, source: str) -> str:
        name, _, version = source.partition("@")
        if version:
            return version
        if name not in self.aliases:
            raise ModelNotFound(f"model {name} has no alias 'serving'")
        return self.aliases[name]


def reconciler(
    models: list[DeployedEntry], store: Store, apps: FakeApps, board: FakeBoard, **kw: Any
) -> Reconciler:
    clock = iter(range(1_000_000))  # one "second" per reading: timeouts pass quickly
    return Reconciler(
        models,
        resolve=store.resolve,
        apps=apps,
        board=board,
        on_event=lambda message: apps.log.append(f"event {message}"),
        clock=lambda: float(next(clock)),
        **kw,
    )


def actions(apps: FakeApps) -> list[str]:
    return [line for line in apps.log if not line.startswith("event")]
