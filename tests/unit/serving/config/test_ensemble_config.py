"""Ensemble and fault config: what is refused (naming the field), what an ensemble entry
means for deployment (nothing of its own) and for the gateway (a router, callable, listed)."""

from __future__ import annotations

import pytest

from serving.config import ConfigError, parse_config
from serving.gateway.core import GatewayCore
from serving.rollout.route_table import RouteFollower
from serving.server import required_cpus


def digits(name: str, **overrides: object) -> dict:
    return {"name": name, "source": name, "task": "classify", "num_cpus": 1, **overrides}


def ensemble(**overrides: object) -> dict:
    section = {"members": ["d-a", "d-b", "d-c"], "combine": "mean", "deadline_ms": 100}
    return {
        "name": "digits",
        "task": "classify",
        "ensemble": section | overrides.pop("section", {}),
        **overrides,
    }


def config(*extra: dict, members: tuple[str, ...] = ("d-a", "d-b", "d-c")):
    return parse_config(
        {"training": {"enabled": False}, "models": [*(digits(m) for m in members), *extra]}
    )


def test_an_ensemble_is_callable_and_listed_but_deploys_and_reserves_nothing():
    loom = config(ensemble())

    assert loom.served_names() == ("d-a", "d-b", "d-c", "digits")
    assert loom.served("digits").ensemble.members == ("d-a", "d-b", "d-c")
    assert [m.name for m in loom.deployed()] == ["d-a", "d-b", "d-c"]
    # 3 members x 1 CPU; the ensemble's own num_cpus (default 1.0) counts nothing
    assert required_cpus(loom) == max(3, required_cpus(config()))
    assert loom.served("digits").ensemble.needed == 3  # quorum defaults to every member


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (ensemble(section={"members": ["d-a"]}), "models.3.ensemble.members: .*at least 2"),
        (ensemble(section={"members": ["d-a", "d-a"]}), "repeated: d-a"),
        (ensemble(section={"members": ["d-a", "d-z"]}), r"models.3.ensemble.members: d-z is not"),
        (ensemble(section={"quorum": 4}), "quorum 4 exceeds the 3 members"),
        (ensemble(section={"quorum": 0}), "models.3.ensemble.quorum"),
        (ensemble(section={"deadline_ms": 0}), "models.3.ensemble.deadline_ms"),
        (ensemble(section={"combine": "weighted_mean"}), "weights is required"),
        (
            ensemble(section={"combine": "weighted_mean", "weights": {"d-a": 1, "d-b": 1}}),
            "weights must name each member once",
        ),
        (
            ensemble(
                section={"combine": "weighted_mean", "weights": {"d-a": 1, "d-b": 1, "d-c": 0}}
            ),
            "weights must be > 0",
        ),
        (ensemble(section={"weights": {"d-a": 1, "d-b": 1, "d-c": 1}}), "weighted_mean only"),
        (ensemble(section={"combine": "concat"}), "combine concat serves task embed"),
        (ensemble(source="digits"), "not source, traffic or multiplex"),
        (ensemble(section={"hedge_after_ms": -1}), "models.3.ensemble.hedge_after_ms"),
    ],
)
def test_an_invalid_ensemble_is_refused_naming_the_field(entry: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        config(entry)


def test_members_must_be_served_models_of_the_ensembles_task_not_pools_or_ensembles():
    pool = {"name": "pool", "task": "classify", "multiplex": {"models": ["p-a@1", "p-b@1"]}}
    embedder = {"name": "mini", "source": "minilm", "task": "embed"}
    inner = ensemble(name="inner")
    outer = ensemble(name="outer", section={"members": ["inner", "pool", "mini", "p-a"]})

    with pytest.raises(ConfigError) as refused:
        parse_config({"models": [*(digits(m) for m in ("d-a", "d-b", "d-c")), pool, embedder,
                                 inner, outer]})  # fmt: skip

    message = str(refused.value)
    assert "models.6.ensemble.members: inner is an ensemble" in message
    assert "models.6.ensemble.members: pool is a pool's name" in message
    assert "models.6.ensemble.members: mini is a embed model; this ensemble is classify" in message
    assert "p-a" not in message  # a pool's member is a served model: allowed


def test_faults_are_checked_and_apply_only_to_a_models_own_replicas():
    loom = config(members=("d-a", "d-b"))
    slow = digits("d-s", faults={"delay_ms": 50, "delay_probability": 0.05})
    assert parse_config({"models": [slow]}).models[0].faults.delay_ms == 50

    with pytest.raises(ConfigError, match="models.0.faults.delay_probability"):
        parse_config({"models": [digits("d-s", faults={"delay_probability": 1.5})]})
    with pytest.raises(ConfigError, match="models.0.faults.delay_s"):  # unknown field named
        parse_config({"models": [digits("d-s", faults={"delay_s": 1})]})
    with pytest.raises(ConfigError, match="faults apply to an embed or classify"):
        config(ensemble(section={"members": ["d-a", "d-b"]}, faults={"delay_ms": 1}),
               members=("d-a", "d-b"))  # fmt: skip
    assert loom.models[0].faults is None


def test_the_gateway_has_a_router_per_ensemble_and_checks_readiness_of_deployed_models_only():
    loom = config(ensemble())
    gw = GatewayCore(loom, RouteFollower(lambda *_: None), store=None)

    assert list(gw.ensembles) == ["digits"]
    assert gw.ensembles["digits"].members == ("d-a", "d-b", "d-c")
    assert gw.readiness._models == ["d-a", "d-b", "d-c"]  # never waits on a route for "digits"
