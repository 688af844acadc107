"""The hedge-aware router on real Serve replicas: a call's duplicate (same hedge group) goes to
a replica other than the first call's even when the two replicas tie on load, where Serve's
default router tosses a coin; with one replica it still goes, to that one."""

from __future__ import annotations

import asyncio
import time

from ray import serve
from ray.serve.config import RequestRouterConfig

from serving.routing.hedge_router import HedgeAwareRouter, hedge_group

APP = "hedge-routing-test"
HOLD_S = 0.6
"""How long a holding call keeps its replica busy: the rounds' calls overlap within it."""
ROUNDS = 12
"""Rounds with both replicas holding one call: Serve's default router would send the
duplicate back to the first call's replica in each with probability 1/2, so passing all 12
by chance is 1 in 4096."""


@serve.deployment(
    ray_actor_options={"num_cpus": 0.1},
    max_ongoing_requests=8,
    request_router_config=RequestRouterConfig(request_router_class=HedgeAwareRouter),
)
class Where:
    """Holds each call ``hold_s``, then names the replica that served it."""

    async def __call__(self, hold_s: float) -> str:
        await asyncio.sleep(hold_s)
        return serve.get_replica_context().replica_id.unique_id


def run(replicas: int) -> serve.handle.DeploymentHandle:
    return serve.run(
        Where.options(num_replicas=replicas).bind(), name=f"{APP}-{replicas}", route_prefix=None
    )


def test_a_duplicate_goes_to_the_other_replica_even_when_both_are_equally_busy(
    serve_running: None,
) -> None:
    handle = run(replicas=2)
    assert len({handle.remote(0.0).result() for _ in range(20)}) == 2  # both replicas up

    tied = 0
    for _ in range(ROUNDS):
        other = handle.remote(HOLD_S)  # one replica holds an unrelated call
        time.sleep(0.1)  # ... counted there before the next is routed
        group = handle.options(session_id=hedge_group())
        first = group.remote(HOLD_S)  # the idler one: each replica now holds one call
        time.sleep(0.1)  # the first call is placed before its duplicate is sent
        duplicate = group.remote(0.0)  # a tie on load: only the group decides

        assert duplicate.result() != first.result()
        tied += other.result() != first.result()
    # the rounds were the ties they are meant to be (power of two choices put ``first`` on
    # the idle replica), not rounds where load alone sent the duplicate away
    assert tied >= ROUNDS // 2, tied


def test_with_one_replica_the_duplicate_still_goes_to_it(serve_running: None) -> None:
    handle = run(replicas=1)
    group = handle.options(session_id=hedge_group())

    first = group.remote(HOLD_S)
    time.sleep(0.15)
    duplicate = group.remote(0.0)

    assert duplicate.result(timeout_s=10) == first.result(timeout_s=10)
