"""The rollout reconciler: serving follows the store's aliases without a restart.

Each served model version is its own Serve application (``loom.<model>@<version>``, no HTTP
route); the gateway reaches versions through the route table (``serving.route_table``). A
thread in the ``loom serve`` process observes, decides and applies, every
``rollout.poll_interval_s``:

- observe: what each model's source resolves to in the store now (an alias may have moved:
  ``loom models promote``, ``POST /v1/admin/models/{name}/promote``, a training pipeline),
  and the version apps Serve has with their states. A source that resolves to nothing yet (a
  model configured before its first version is trained) is a state, not an error: the model
  waits, its callers get 503 naming what is missing (the table's ``waiting``), the rest
  serve, and the tick that first resolves it starts it;
- decide: ``serving.rollout.plan.plan_rollout`` (pure);
- apply: deploy new version apps; once they are RUNNING publish a new route table and wait
  until every gateway acknowledges it with nothing left in flight on the versions it dropped
  (at most ``rollout.drain_timeout_s``); delete the dropped apps on the next step. Serve's
  deletion drains too: a replica finishes what it holds, streams included, before it stops
  (``graceful_shutdown_timeout_s`` = the drain timeout).

A source pinned to ``NAME@VERSION`` resolves to the same version forever, so it never moves;
a ``traffic`` split names its versions in the config.

    reconciler = Reconciler(config.models, resolve=..., apps=ServeVersionApps(...), board=...)
    reconciler.wait_until_serving(timeout_s=600)   # first versions RUNNING, gateway routing
    reconciler.start(); ...; reconciler.stop()
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from models.errors import StoreError
from models.refs import ModelRef
from serving.autoscaling.pollers import Source
from serving.config.model import DeployedEntry, ModelConfig
from serving.config.pool import POOL_VERSION
from serving.monitoring.sidecar_actor import ReplicaMonitoring
from serving.replicas.deployment import replica_deployment
from serving.rollout.plan import (
    AppState,
    GatewayReport,
    RolloutPlan,
    VersionKey,
    Weights,
    desired_weights,
    dropped_apps,
    gateways_caught_up,
    plan_rollout,
    unresolved_reason,
)
from serving.rollout.route_table import VersionRoute
from serving.rollout.serve_status import read_serve_apps
from serving.routing.ring import shard_ids
from serving.routing.sharding import base_model, shard_entry

logger = logging.getLogger(__name__)

GATEWAY_STALE_AFTER_S = 15.0
"""A gateway silent this long is gone. Above the poll wait (1 s) plus the warm-up of a new
version's handle (5 s), so a live gateway is never taken for a dead one."""


@dataclass(frozen=True, slots=True)
class AppStatus:
    state: AppState
    message: str = ""


class VersionApps(Protocol):
    """What the reconciler does to Ray Serve, and no more."""

    def states(self) -> dict[VersionKey, AppStatus]: ...

    def deploy(self, key: VersionKey) -> None: ...

    def delete(self, key: VersionKey) -> None: ...

    def handle(self, key: VersionKey) -> Any: ...


class Board(Protocol):
    """The route table, seen from the reconciler."""

    def publish(
        self, routes: Mapping[str, tuple[VersionRoute, ...]], *, waiting: Mapping[str, str]
    ) -> int: ...

    def reports(self) -> Mapping[str, GatewayReport]: ...

    def shard_requests(self) -> Mapping[str, int]: ...


class Reconciler:
    def __init__(
        self,
        models: Sequence[DeployedEntry],
        *,
        resolve: Callable[[str], str],
        apps: VersionApps,
        board: Board,
        poll_interval_s: float = 0.5,
        drain_timeout_s: float = 75.0,
        stale_after_s: float = GATEWAY_STALE_AFTER_S,
        on_event: Callable[[str], None] = logger.info,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``resolve(source) -> version`` reads the store; ``on_event`` hears each rollout step."""
        self._models = {m.name: m for m in models}
        self.shards = {m.name: m.sharding.shards for m in models if m.sharding is not None}
        """Sharded model -> its shard count now (config, then resharding requests)."""
        self._resolve = resolve
        self._apps = apps
        self._board = board
        self._poll_interval_s = poll_interval_s
        self._drain_timeout_s = drain_timeout_s
        self._stale_after_s = stale_after_s
        self._on_event = on_event
        self._clock = clock
        self.routed: dict[str, dict[str, float]] = {}
        """Model -> weights every gateway acknowledged."""
        self.epoch = 0
        self.states: dict[VersionKey, AppStatus] = {}
        self._handles: dict[VersionKey, Any] = {}
        self._told: set[str] = set()
        self.waiting: dict[str, str] = {}
        """Entry -> why it serves nothing yet (its source does not resolve), as clients see it."""
        self._published_waiting: dict[str, str] = {}
        self._settled_for: tuple[dict[str, Weights], dict[str, str]] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one step ----------------------------------------------------------------------------

    def desired(self) -> dict[str, Weights]:
        """What each model should serve now. A model whose source does not resolve in the store
        is a normal state, not an error: one that serves keeps what it serves (an alias
        removed); one that serves nothing yet (no version registered, its alias not set) is
        left out and put in ``waiting`` with the reason, until a later tick resolves it. Each
        is said once in the log."""
        desired: dict[str, Weights] = {}
        waiting: dict[str, str] = {}
        for model in self._models.values():
            try:
                weights = self._weights_now(model)
            except _Unresolved as unresolved:
                routed = [e for e in self.entries(model.name) if e in self.routed]
                outcome = "keeps serving what it serves" if routed else "not ready until it does"
                self._tell_once(
                    f"{model.name}: {unresolved.source} does not resolve in the store "
                    f"({unresolved.error}); {outcome}"
                )
                for entry in self.entries(model.name):
                    if entry in self.routed:  # keep what it serves
                        desired[entry] = self.routed[entry]
                    else:
                        waiting[entry] = unresolved_reason(unresolved.source, unresolved.error)
                continue
            for entry in self.entries(model.name):  # a sharded model: every shard
                desired[entry] = weights
        self.waiting = waiting
        return desired

    def _weights_now(self, model: DeployedEntry) -> dict[str, float]:
        """The model's weights from the store now; ``_Unresolved`` naming the first reference
        that does not resolve (its source, a version its split names, a pool's member)."""
        if not isinstance(model, ModelConfig):  # a pool: one routed entry for all its members
            for ref in model.multiplex.models:
                self._resolve_or_raise(ref)
            return {POOL_VERSION: 1.0}
        if model.traffic is not None:
            store_name = ModelRef.parse(model.source).name
            for version in sorted(model.traffic):
                self._resolve_or_raise(f"{store_name}@{version}")
            return desired_weights(model, "")
        return desired_weights(model, self._resolve_or_raise(model.source))

    def _resolve_or_raise(self, source: str) -> str:
        try:
            return self._resolve(source)
        except (StoreError, OSError) as exc:  # OSError: a store folder no store error covers
            raise _Unresolved(source, exc) from None

    def entries(self, model: str) -> tuple[str, ...]:
        """The route-table entries of ``model``: itself, or one per shard (``m~0``, ``m~1``)."""
        count = self.shards.get(model)
        if count is None:
            return (model,)
        return tuple(shard_entry(model, shard) for shard in shard_ids(count))

    def _follow_shard_requests(self) -> None:
        """Apply resharding asked for on the board (``POST /v1/admin/shards/{model}``)."""
        for model, count in self._board.shard_requests().items():
            if model in self.shards and self.shards[model] != count:
                self._on_event(f"{model}: resharding {self.shards[model]} -> {count} shards")
                self.shards[model] = count

    def step(self) -> RolloutPlan:
        """Observe, plan, apply once. Returns the plan it applied.

        Once settled (every app RUNNING, nothing to do) it asks Serve nothing until the store
        says something else: a tick is then two small file reads, not a controller call."""
        if self.shards:
            self._follow_shard_requests()
        desired = self.desired()
        if self._settled_for == (desired, self.waiting):
            return RolloutPlan()
        self.states = self._apps.states()
        plan = plan_rollout(desired, self.routed, {k: s.state for k, s in self.states.items()})
        if plan.routes is None and self.waiting != self._published_waiting:
            # the same routes, but what the gateways tell a waiting model's callers changed
            plan = replace(plan, routes=dict(self.routed))
        settled = plan.is_idle and all(s.state == AppState.RUNNING for s in self.states.values())
        self._settled_for = (desired, dict(self.waiting)) if settled else None
        self._report_failures(desired)
        for key in plan.deploy:
            self._on_event(f"{key.model}: starting version {key.version} ({key.app_name})")
            self._apps.deploy(key)
        if plan.routes is not None:
            self._publish(plan.routes)
        for key in plan.delete:
            self._on_event(f"{key.model}: version {key.version} drained; deleting {key.app_name}")
            self._apps.delete(key)
            self._handles.pop(key, None)
        return plan

    def _publish(self, routes: Mapping[str, Weights]) -> None:
        table = {
            model: tuple(
                sorted(
                    (
                        VersionRoute(
                            model, v, w, VersionKey(model, v).app_name, self._handle(model, v)
                        )
                        for v, w in weights.items()
                    ),
                    key=lambda r: (-r.weight, r.version),
                )
            )
            for model, weights in routes.items()
        }
        for model, weights in routes.items():
            before = self.routed.get(model)
            if before != dict(weights):
                self._on_event(
                    f"{model}: routing {_weights_text(weights)} (was {_weights_text(before)})"
                )
        self.epoch = self._board.publish(table, waiting=dict(self.waiting))
        self._published_waiting = dict(self.waiting)
        dropped = dropped_apps(self.routed, routes)
        deadline = self._clock() + self._drain_timeout_s
        while not gateways_caught_up(
            self._board.reports(), self.epoch, dropped, stale_after_s=self._stale_after_s
        ):
            if self._clock() > deadline:
                self._on_event(
                    f"gateways did not drain {sorted(dropped)} within "
                    f"{self._drain_timeout_s:.0f} s; deleting them anyway"
                )
                break
            if self._stop.wait(0.05):
                break
        self.routed = {model: dict(weights) for model, weights in routes.items()}

    def _handle(self, model: str, version: str) -> Any:
        key = VersionKey(model, version)
        if key not in self._handles:
            self._handles[key] = self._apps.handle(key)
        return self._handles[key]

    def _report_failures(self, desired: Mapping[str, Weights]) -> None:
        for model, weights in desired.items():
            for version in weights:
                status = self.states.get(VersionKey(model, version))
                if status is not None and status.state == AppState.FAILED:
                    serving = _weights_text(self.routed.get(model))
                    self._tell_once(
                        f"{model}: version {version} failed to start ({status.message}); "
                        f"still serving {serving}"
                    )

    def _tell_once(self, message: str) -> None:
        if message not in self._told:
            self._told.add(message)
            self._on_event(message)

    # -- start-up and the thread -------------------------------------------------------------

    def serving(self) -> bool:
        """Every model routes to what it should (one whose source does not resolve yet has
        nothing to route: it waits, and the rest serve), and a gateway routes by the newest
        table."""
        desired = self.desired()
        if any(self.routed.get(m) != dict(w) for m, w in desired.items()):
            return False
        entries = (e for m in self._models for e in self.entries(m))
        if any(e not in desired and e not in self.waiting for e in entries):
            return False
        return any(
            r.epoch >= self.epoch and r.age_s <= self._stale_after_s
            for r in self._board.reports().values()
        )

    def wait_until_serving(self, timeout_s: float, interval_s: float = 0.25) -> None:
        """Step until every model serves; RuntimeError if a first version fails to start,
        TimeoutError past ``timeout_s``."""
        deadline = self._clock() + timeout_s
        while True:
            self.step()
            if self.serving():
                return
            for entry in (e for m in self._models for e in self.entries(m)):
                if entry in self.routed:
                    continue
                for key, status in self.states.items():
                    if key.model == entry and status.state == AppState.FAILED:
                        raise RuntimeError(f"deployment failed: {key.app_name}: {status.message}")
            if self._clock() > deadline:
                raise TimeoutError(f"the models were not serving within {timeout_s:.0f} s")
            time.sleep(interval_s)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="loom-reconciler", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception as exc:  # Serve busy or shutting down: try again next tick
                if not self._stop.is_set():
                    self._on_event(f"rollout step failed: {exc!r}")
            self._stop.wait(self._poll_interval_s)


class _Unresolved(Exception):
    """A store reference of a model that does not resolve now, and the store's error."""

    def __init__(self, source: str, error: Exception) -> None:
        super().__init__(source)
        self.source = source
        self.error = error


def _weights_text(weights: Mapping[str, float] | None) -> str:
    if not weights:
        return "nothing"
    if len(weights) == 1:
        return f"version {next(iter(weights))}"
    return ", ".join(f"version {v} x{w:g}" for v, w in sorted(weights.items()))


# -- the real edges: Ray Serve and the board actor --------------------------------------------


class ServeVersionApps:
    """Version apps on Ray Serve, each built by ``replica_deployment`` with the model's source
    pinned to the version."""

    def __init__(
        self,
        models: Sequence[DeployedEntry],
        *,
        monitoring: ReplicaMonitoring | None,
        scaling: Source | None,
        models_dir: str,
        drain_timeout_s: float,
    ) -> None:
        """``monitoring``: where replicas report (their sidecar); ``scaling``: where an
        autoscaled model's policy reads its signals."""
        self._models = {m.name: m for m in models}
        self._monitoring = monitoring
        self._scaling = scaling
        self._models_dir = models_dir
        self._drain_timeout_s = drain_timeout_s

    def pinned(self, key: VersionKey) -> DeployedEntry:
        model = self._models[base_model(key.model)]  # a shard runs its model's config
        if not isinstance(model, ModelConfig):
            return model  # a pool: members are pinned refs already
        store_name = ModelRef.parse(model.source).name
        return model.model_copy(update={"source": f"{store_name}@{key.version}", "traffic": None})

    def deploy(self, key: VersionKey) -> None:
        pinned = self.pinned(key)
        # Serve's own drain on delete: a replica waits for what it holds (a long stream too)
        deployment = replica_deployment(pinned, scaling=self._scaling).options(
            graceful_shutdown_timeout_s=self._drain_timeout_s
        )
        app = deployment.bind(pinned.model_dump(), self._models_dir, self._monitoring)
        serve.run_many(
            [serve.RunTarget(app, name=key.app_name, route_prefix=None)],
            wait_for_applications_running=False,
        )

    def states(self) -> dict[VersionKey, AppStatus]:
        states = {}
        for name, app in read_serve_apps().items():
            key = VersionKey.from_app_name(name)
            if key is None or base_model(key.model) not in self._models:
                continue
            states[key] = AppStatus(app.state, app.messages())
        return states

    def delete(self, key: VersionKey) -> None:
        serve.delete(key.app_name, _blocking=False)

    def handle(self, key: VersionKey) -> DeploymentHandle:
        return serve.get_app_handle(key.app_name)


class ActorBoard:
    """``Board`` over the ``RouteBoard`` actor; ``term``: the control-plane lease epoch every
    publish is fenced by (None: unfenced)."""

    def __init__(self, actor: Any, *, term: int | None = None) -> None:
        self._actor = actor
        self._term = term

    def publish(
        self, routes: Mapping[str, tuple[VersionRoute, ...]], *, waiting: Mapping[str, str]
    ) -> int:
        return ray.get(self._actor.publish.remote(dict(routes), dict(waiting), self._term))

    def reports(self) -> Mapping[str, GatewayReport]:
        return ray.get(self._actor.reports.remote())

    def shard_requests(self) -> Mapping[str, int]:
        return ray.get(self._actor.shard_requests.remote())
