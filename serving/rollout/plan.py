"""Rollout decisions: which model versions should serve, what to deploy, route and delete next.

Pure functions of plain values (no Ray, no store, no clock): the reconciler
(``serving.rollout.reconciler``) observes, these decide, the reconciler applies. The order
they encode is the zero-downtime rule: a new version is deployed and RUNNING before any
traffic moves to it; traffic moves by publishing a new route table; an old version is
deleted only once the table that dropped it is the one every gateway acknowledged (the
reconciler waits for that between two plans).

    desired = {"minilm": desired_weights(model, resolved_version="2")}      # {"2": 1.0}
    plan = plan_rollout(desired, routed={"minilm": {"1": 1.0}}, apps={key1: RUNNING})
    plan.deploy            # (VersionKey("minilm", "2"),): start it beside version 1
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from models.errors import ModelNotFound
from models.refs import ModelRef
from serving.config.model import DeployedEntry, ModelConfig

Weights = Mapping[str, float]
"""Version -> traffic weight for one model, e.g. ``{"3": 90, "4": 10}``."""

VERSION_APP_PREFIX = "loom."
"""Every model version runs as its own Serve application ``loom.<model>@<version>``."""


@dataclass(frozen=True, slots=True, order=True)
class VersionKey:
    """One served model at one store version: the unit that is deployed and deleted."""

    model: str
    """The served name (config ``models[].name``), not the store name."""
    version: str

    @property
    def app_name(self) -> str:
        # a served name holds no '@' (config rule), so the last '@' splits it back
        return f"{VERSION_APP_PREFIX}{self.model}@{self.version}"

    @classmethod
    def from_app_name(cls, app_name: str) -> VersionKey | None:
        """The key a Serve application name encodes, or None for an app that is not a version."""
        if not app_name.startswith(VERSION_APP_PREFIX):
            return None
        model, at, version = app_name[len(VERSION_APP_PREFIX) :].rpartition("@")
        return cls(model, version) if at and model and version else None


class AppState(enum.StrEnum):
    """A version application's state, from Serve's application status."""

    DEPLOYING = "DEPLOYING"
    RUNNING = "RUNNING"
    UNHEALTHY = "UNHEALTHY"
    FAILED = "FAILED"
    DELETING = "DELETING"


_SERVE_TO_STATE = {
    "NOT_STARTED": AppState.DEPLOYING,
    "DEPLOYING": AppState.DEPLOYING,
    "RUNNING": AppState.RUNNING,
    "UNHEALTHY": AppState.UNHEALTHY,
    "DEPLOY_FAILED": AppState.FAILED,
    "DELETING": AppState.DELETING,
}


def app_state(serve_status: str) -> AppState:
    """Serve's ``ApplicationStatus`` value -> ``AppState`` (unknown values count as deploying)."""
    return _SERVE_TO_STATE.get(serve_status, AppState.DEPLOYING)


def follows_alias(model: DeployedEntry) -> bool:
    """True when the model's version can move: ``NAME`` or ``NAME#ALIAS``, no traffic split
    (a pool never moves: its members are pinned)."""
    if not isinstance(model, ModelConfig):
        return False
    return model.traffic is None and ModelRef.parse(model.source).version is None


def desired_weights(model: ModelConfig, resolved_version: str) -> dict[str, float]:
    """The versions ``model`` should serve now and their weights.

    ``resolved_version`` is what the model's source resolves to in the store right now (the
    alias's target, or the pinned version). A traffic split names its versions itself:
    ``traffic {"3": 90, "4": 10}`` -> ``{"3": 90.0, "4": 10.0}``; otherwise one version
    takes all traffic: ``{"4": 1.0}``.
    """
    if model.traffic is not None:
        return {version: float(weight) for version, weight in model.traffic.items()}
    return {resolved_version: 1.0}


def unresolved_reason(source: str, error: Exception) -> str:
    """What a client is told while ``source`` (a store reference) does not resolve: the version
    or alias it waits for, in words, and no server path (the log has ``error`` in full).

        unresolved_reason("digits", ModelNotFound(...))          # "digits has no version ..."
        unresolved_reason("digits#serving", ModelNotFound(...))  # "alias 'serving' of ..."
    """
    ref = ModelRef.parse(source)
    if not isinstance(error, ModelNotFound):  # a store error: unreadable, not merely missing
        return f"{source} cannot be read from the model store (the server log says why)"
    if ref.version is not None:
        return f"version {ref.version} of {ref.name} is not in the model store yet"
    if ref.alias is not None:
        return f"alias '{ref.alias}' of {ref.name} is not set in the model store yet"
    return (
        f"{ref.name} has no version in the model store yet (it serves its 'serving' alias, "
        "else its latest version, once one is registered)"
    )


@dataclass(frozen=True)
class RolloutPlan:
    """What the reconciler does next, in this order: deploy, publish ``routes``, delete."""

    deploy: tuple[VersionKey, ...] = ()
    routes: Mapping[str, Weights] | None = None
    """The whole new route table to publish; None when it stays as it is."""
    delete: tuple[VersionKey, ...] = ()
    waiting: Mapping[str, tuple[VersionKey, ...]] = field(default_factory=dict)
    """Per model, the desired versions not yet RUNNING (why its route did not move)."""

    @property
    def is_idle(self) -> bool:
        return not (self.deploy or self.routes is not None or self.delete)


def plan_rollout(
    desired: Mapping[str, Weights],
    routed: Mapping[str, Weights],
    apps: Mapping[VersionKey, AppState],
) -> RolloutPlan:
    """The next step from what should serve (``desired``), what the gateways route to now
    (``routed``, acknowledged by every gateway) and the version apps Serve has (``apps``).

    - deploy every desired version with no app (one being deleted is redeployed once gone);
    - move a model's route to its desired weights once every desired version is RUNNING
      (a version that is deploying, unhealthy or failed leaves the old route serving);
    - drop from the route an entry no longer desired (a shard that resharding removed);
    - delete every app that is neither desired, routed now, nor in the new route. An app the
      new route drops stays until the next plan, when ``routed`` is that new route: the
      reconciler publishes, waits for every gateway to acknowledge, and only then plans again.

    1 -> 2 with version 1 routed: plan 1 deploys 2; plans while 2 deploys do nothing; the plan
    once 2 runs routes to 2; the plan after the gateways acknowledge deletes 1.
    """
    deploy = tuple(
        key
        for model, weights in sorted(desired.items())
        for key in (VersionKey(model, v) for v in sorted(weights))
        if key not in apps
    )
    # an entry no longer desired (a shard removed by resharding) leaves the table; its app is
    # deleted by the plan after the gateways acknowledge that
    new_routes = {model: dict(weights) for model, weights in routed.items() if model in desired}
    waiting: dict[str, tuple[VersionKey, ...]] = {}
    for model, weights in desired.items():
        not_running = tuple(
            key
            for key in (VersionKey(model, v) for v in sorted(weights))
            if apps.get(key) != AppState.RUNNING
        )
        if not_running:
            waiting[model] = not_running
        elif dict(routed.get(model, {})) != dict(weights):
            new_routes[model] = dict(weights)
    changed = new_routes != {m: dict(w) for m, w in routed.items()}
    keep = {
        VersionKey(model, version)
        for table in (desired, routed, new_routes)
        for model, weights in table.items()
        for version in weights
    }
    delete = tuple(
        key for key, state in sorted(apps.items()) if key not in keep and state != AppState.DELETING
    )
    return RolloutPlan(
        deploy=deploy, routes=new_routes if changed else None, delete=delete, waiting=waiting
    )


def dropped_apps(old: Mapping[str, Weights], new: Mapping[str, Weights]) -> frozenset[str]:
    """App names routed in ``old`` but not in ``new``: what gateways must drain before delete."""

    def keys(table: Mapping[str, Weights]) -> set[str]:
        return {VersionKey(m, v).app_name for m, weights in table.items() for v in weights}

    return frozenset(keys(old) - keys(new))


def pick_version(weights: Sequence[float], draw: float) -> int:
    """Index of the version a request goes to, for ``draw`` uniform in [0, 1).

    Weights [90, 10]: draws below 0.9 pick 0, the rest pick 1. Weights need not sum to 1.
    """
    total = sum(weights)
    threshold = draw * total
    running = 0.0
    for index, weight in enumerate(weights):
        running += weight
        if threshold < running:
            return index
    return len(weights) - 1  # draw * total rounding up to exactly total


@dataclass(frozen=True, slots=True)
class GatewayReport:
    """What one gateway replica last said: the table it routes by and its requests in flight."""

    epoch: int
    """The route table epoch it applied."""
    busy: Mapping[str, int]
    """App name -> requests it has in flight there (only non-zero entries)."""
    age_s: float
    """Seconds since the report arrived."""


def gateways_caught_up(
    reports: Mapping[str, GatewayReport],
    epoch: int,
    dropped: frozenset[str],
    *,
    stale_after_s: float,
) -> bool:
    """True once every live gateway routes by table ``epoch`` and has no request left in flight
    on an app that table dropped. A gateway silent for more than ``stale_after_s`` is gone (a
    replica that stopped); one that starts later reads the newest table before it routes."""
    for report in reports.values():
        if report.age_s > stale_after_s:
            continue
        if report.epoch < epoch:
            return False
        if any(report.busy.get(app, 0) > 0 for app in dropped):
            return False
    return True
