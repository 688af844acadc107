"""The rollout's pure decisions: desired versions, the next step, the weighted pick."""

from __future__ import annotations

import pytest

from serving.config import ModelConfig
from serving.rollout.plan import (
    AppState,
    GatewayReport,
    VersionKey,
    app_state,
    desired_weights,
    dropped_apps,
    follows_alias,
    gateways_caught_up,
    pick_version,
    plan_rollout,
)

RUNNING, DEPLOYING, FAILED, DELETING = (
    AppState.RUNNING,
    AppState.DEPLOYING,
    AppState.FAILED,
    AppState.DELETING,
)


def key(model: str, version: str) -> VersionKey:
    return VersionKey(model, version)


@pytest.mark.parametrize(
    ("source", "traffic", "follows"),
    [
        ("minilm", None, True),  # the serving alias
        ("minilm#canary", None, True),
        ("minilm@3", None, False),  # pinned never moves
        ("minilm", {"3": 90, "4": 10}, False),  # a split names its versions
    ],
)
def test_only_alias_sources_follow_the_store(source, traffic, follows):
    model = ModelConfig(name="m", source=source, traffic=traffic)
    assert follows_alias(model) is follows


@pytest.mark.parametrize(
    ("source", "traffic", "resolved", "expected"),
    [
        ("minilm", None, "4", {"4": 1.0}),
        ("minilm@3", None, "3", {"3": 1.0}),
        ("minilm", {"3": 90, "4": 10}, "", {"3": 90.0, "4": 10.0}),
    ],
)
def test_desired_weights(source, traffic, resolved, expected):
    model = ModelConfig(name="m", source=source, traffic=traffic)
    assert desired_weights(model, resolved) == expected


@pytest.mark.parametrize(
    ("app_name", "parsed"),
    [
        ("loom.minilm@2", key("minilm", "2")),
        ("loom.my.model@v1.2", key("my.model", "v1.2")),
        ("loom", None),  # the gateway's app
        ("other@1", None),
        ("loom.@1", None),
        ("loom.m@", None),
    ],
)
def test_app_names_round_trip_to_version_keys(app_name, parsed):
    assert VersionKey.from_app_name(app_name) == parsed
    if parsed is not None:
        assert parsed.app_name == app_name


def test_serve_statuses_map_to_app_states():
    assert [app_state(s) for s in ("DEPLOYING", "RUNNING", "DEPLOY_FAILED", "DELETING")] == [
        DEPLOYING,
        RUNNING,
        FAILED,
        DELETING,
    ]
    assert app_state("UNHEALTHY") == AppState.UNHEALTHY


# desired, routed (acknowledged), apps -> deploy, routes (None: unchanged), delete
PLANS = [
    pytest.param(
        {"m": {"1": 1.0}},
        {},
        {},
        ([key("m", "1")], None, []),
        id="start: deploy the first version, route nothing yet",
    ),
    pytest.param(
        {"m": {"1": 1.0}},
        {},
        {key("m", "1"): RUNNING},
        ([], {"m": {"1": 1.0}}, []),
        id="first version running: route it",
    ),
    pytest.param(
        {"m": {"2": 1.0}},
        {"m": {"1": 1.0}},
        {key("m", "1"): RUNNING},
        ([key("m", "2")], None, []),
        id="alias moved: start 2 beside 1, 1 keeps all traffic",
    ),
    pytest.param(
        {"m": {"2": 1.0}},
        {"m": {"1": 1.0}},
        {key("m", "1"): RUNNING, key("m", "2"): DEPLOYING},
        ([], None, []),
        id="2 still loading: nothing moves",
    ),
    pytest.param(
        {"m": {"2": 1.0}},
        {"m": {"1": 1.0}},
        {key("m", "1"): RUNNING, key("m", "2"): RUNNING},
        ([], {"m": {"2": 1.0}}, []),
        id="2 running: route to it, 1 is not deleted in the same step",
    ),
    pytest.param(
        {"m": {"2": 1.0}},
        {"m": {"2": 1.0}},
        {key("m", "1"): RUNNING, key("m", "2"): RUNNING},
        ([], None, [key("m", "1")]),
        id="gateways acknowledged 2: delete 1",
    ),
    pytest.param(
        {"m": {"2": 1.0}},
        {"m": {"1": 1.0}},
        {key("m", "1"): RUNNING, key("m", "2"): FAILED},
        ([], None, []),
        id="2 failed to start: 1 keeps serving, 2 is not retried",
    ),
    pytest.param(
        {"m": {"1": 1.0}},
        {"m": {"1": 1.0}},
        {key("m", "1"): RUNNING, key("m", "2"): DEPLOYING},
        ([], None, [key("m", "2")]),
        id="alias moved back before 2 was ready: drop 2",
    ),
    pytest.param(
        {"m": {"1": 1.0}},
        {"m": {"2": 1.0}},
        {key("m", "1"): DELETING, key("m", "2"): RUNNING},
        ([], None, []),
        id="rolled back to a version still being deleted: wait until it is gone",
    ),
    pytest.param(
        {"m": {"3": 90.0, "4": 10.0}},
        {},
        {key("m", "3"): RUNNING, key("m", "4"): DEPLOYING},
        ([], None, []),
        id="a split routes only once every version in it runs",
    ),
    pytest.param(
        {"m": {"3": 90.0, "4": 10.0}},
        {},
        {key("m", "3"): RUNNING, key("m", "4"): RUNNING},
        ([], {"m": {"3": 90.0, "4": 10.0}}, []),
        id="a split routes both versions with their weights",
    ),
    pytest.param(
        {"a": {"1": 1.0}, "b": {"5": 1.0}},
        {"a": {"1": 1.0}, "b": {"5": 1.0}},
        {key("a", "1"): RUNNING, key("b", "5"): RUNNING, key("gone", "1"): RUNNING},
        ([], None, [key("gone", "1")]),
        id="steady: only an app of no configured model goes",
    ),
]


@pytest.mark.parametrize(("desired", "routed", "apps", "expected"), PLANS)
def test_plan_rollout(desired, routed, apps, expected):
    plan = plan_rollout(desired, routed, apps)
    deploy, routes, delete = expected
    assert list(plan.deploy) == deploy
    assert plan.routes == routes
    assert list(plan.delete) == delete


def test_a_plan_keeps_the_routes_of_models_that_did_not_move():
    plan = plan_rollout(
        {"a": {"2": 1.0}, "b": {"5": 1.0}},
        {"a": {"1": 1.0}, "b": {"5": 1.0}},
        {key("a", "1"): RUNNING, key("a", "2"): RUNNING, key("b", "5"): RUNNING},
    )
    assert plan.routes == {"a": {"2": 1.0}, "b": {"5": 1.0}}
    assert plan.waiting == {}


def test_dropped_apps_are_those_the_new_table_no_longer_routes():
    old = {"a": {"1": 1.0}, "b": {"5": 1.0}}
    new = {"a": {"2": 1.0}, "b": {"5": 1.0}}
    assert dropped_apps(old, new) == {"loom.a@1"}
    assert dropped_apps({}, new) == frozenset()


@pytest.mark.parametrize(
    ("weights", "draw", "index"),
    [
        ([1.0], 0.999, 0),
        ([90, 10], 0.0, 0),
        ([90, 10], 0.8999, 0),  # 0.8999 x 100 = 89.99 < 90
        ([90, 10], 0.9, 1),  # 90 is not < 90: the second version
        ([90, 10], 0.9999, 1),
        ([1, 1, 2], 0.49, 1),  # 0.49 x 4 = 1.96: past the first (1), within the second (2)
        ([1, 1, 2], 0.5, 2),
    ],
)
def test_pick_version_by_weight(weights, draw, index):
    assert pick_version(weights, draw) == index


def test_pick_version_splits_a_uniform_sweep_by_weight():
    picks = [pick_version([90, 10], i / 1000) for i in range(1000)]
    assert picks.count(1) == 100  # draws 0.900 .. 0.999: 10 % of 1000


def report(epoch: int, busy: dict[str, int] | None = None, age_s: float = 0.1) -> GatewayReport:
    return GatewayReport(epoch=epoch, busy=busy or {}, age_s=age_s)


@pytest.mark.parametrize(
    ("reports", "caught_up"),
    [
        ({}, True),  # no gateway yet: the first one reads the newest table
        ({"g1": report(3)}, True),
        ({"g1": report(2)}, False),  # still routing by the old table
        ({"g1": report(3), "g2": report(2)}, False),  # every gateway, not one
        ({"g1": report(3, {"loom.m@1": 2})}, False),  # requests still on the dropped version
        ({"g1": report(3, {"loom.m@2": 5})}, True),  # busy on the new one is fine
        ({"g1": report(3), "dead": report(1, age_s=60)}, True),  # silent gateways are gone
    ],
)
def test_gateways_caught_up(reports, caught_up):
    dropped = frozenset({"loom.m@1"})
    assert gateways_caught_up(reports, 3, dropped, stale_after_s=15) is caught_up
