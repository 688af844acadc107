"""Which replicas a hedged call may go to (``serving.hedge_routing.hedge_candidates``): the
duplicate skips its first call's replica whenever there is another; and which deployments
route that way."""

from __future__ import annotations

import pytest
from ray import serve
from ray.serve.config import RequestRouterConfig

from serving.config import parse_config
from serving.replicas.deployment import replica_deployment
from serving.routing.hedge_router import (
    HEDGE_GROUP_PREFIX,
    HedgeAwareRouter,
    hedge_candidates,
    hedge_group,
)


@pytest.mark.parametrize(
    ("candidates", "avoid", "widest", "expected"),
    [
        ({"a", "b"}, None, True, {"a", "b"}),  # no group, or the group's first call
        ({"a", "b"}, "a", True, {"b"}),  # the duplicate: the other replica
        ({"a", "b", "c"}, "b", True, {"a", "c"}),  # two left: power of two choices on them
        ({"a", "b"}, "z", True, {"a", "b"}),  # first call's replica gone: any
        ({"a"}, "a", True, {"a"}),  # one replica in all: it, or no duplicate at all
        ({"a"}, "a", False, set()),  # only it on this node: wait for the round over all
        ({"a", "b"}, "a", False, {"b"}),  # another on this node: that one
    ],
)
def test_a_duplicate_skips_its_first_calls_replica_when_another_is_there(
    candidates: set[str], avoid: str | None, widest: bool, expected: set[str]
) -> None:
    assert hedge_candidates(candidates, avoid, widest=widest) == expected


def test_each_member_call_gets_a_group_of_its_own() -> None:
    groups = {hedge_group() for _ in range(1000)}
    assert len(groups) == 1000
    assert all(g.startswith(HEDGE_GROUP_PREFIX) for g in groups)


def test_single_models_route_with_the_hedge_aware_router_and_pools_with_serves_own() -> None:
    config = parse_config(
        {
            "models": [
                {"name": "m", "source": "minilm"},
                {"name": "p", "task": "classify", "multiplex": {"models": ["a@1", "b@1"]}},
            ]
        }
    )

    def router_of(deployment: serve.Deployment) -> str:
        return deployment._deployment_config.request_router_config.request_router_class

    assert router_of(replica_deployment(config.deployed()[0])) == (
        f"{HedgeAwareRouter.__module__}.{HedgeAwareRouter.__name__}"
    )
    # a pool keeps Serve's FIFO matching of free replicas to the members they hold
    assert router_of(replica_deployment(config.deployed()[1])) == (
        RequestRouterConfig().request_router_class
    )
