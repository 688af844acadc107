"""Hedge-aware replica choice: a member's duplicate call goes to a replica other than the one
its first call is on (the ensemble's hedging, ``serving.routing.ensemble_router``).

Ray Serve's default router picks the less loaded of two random replicas. A hedge usually
lands elsewhere that way, as the first call counts on its replica, but not always: with
another request on the second replica the two tie and a coin decides, so the duplicate goes
back to the first call's replica half the time (``tests/integration/
test_hedge_router_on_serve.py`` fails on Serve's router). A stalled replica also looks idle
once the call it stalled on is cancelled. ``HedgeAwareRouter`` is the default policy (power
of two choices, node locality) with one rule more: a call whose handle carries a hedge group
(``handle.options(session_id=...)``, the group from ``hedge_group()``) skips the replica
that group's first call went to, when there is any other.

Every single-model deployment uses it (``serving.replicas.deployment``); a
call with no hedge group is routed as by Serve's default policy, only out of order (see the
class). A pool keeps Serve's own router, whose FIFO matching hands a free replica holding a
member to a request for it (the multiplexed model id); a hedge to a pool member follows that.
The router lives in the caller's process (the gateway), one per deployment, so it sees both
calls of a group.

    group = hedge_group()
    first = handle.options(session_id=group).classify.remote(rows)     # on replica A
    second = handle.options(session_id=group).classify.remote(rows)    # on B, never A
"""

from __future__ import annotations

import random
import uuid
from collections import OrderedDict
from collections.abc import Set
from typing import Any, TypeVar

from ray.serve.request_router import (
    LocalityMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

HEDGE_GROUP_PREFIX = "loom-hedge:"
"""Session ids of this form name a hedge group; any other session id is not ours."""
REMEMBERED_GROUPS = 4096
"""Groups whose first placement is kept (the oldest forgotten first): far more than a
gateway's calls in flight over one hedge delay."""


T = TypeVar("T")


def hedge_group() -> str:
    """A new group id for one member call and its duplicate."""
    return HEDGE_GROUP_PREFIX + uuid.uuid4().hex


def hedge_candidates(candidates: Set[T], avoid: T | None, *, widest: bool) -> Set[T]:
    """The replicas a call may go to, given the replica its group's first call is on.

    ``candidates`` are this routing round's (node-local first, then every replica);
    ``widest`` says no wider round follows. Without ``avoid`` (no group, or the group's
    first call) or when ``avoid`` is not among them: the candidates. Otherwise the others;
    if there are none, the same candidates in the widest round (one replica: the duplicate
    can only go there) and nothing before it (wait for the wider round).

    {A, B}, avoid A -> {B};  {A}, avoid A, widest -> {A};  {A}, avoid A, node round -> {}
    """
    if avoid is None or avoid not in candidates:
        return candidates
    others = candidates - {avoid}
    if others or not widest:
        return others
    return candidates


class HedgeAwareRouter(LocalityMixin, RequestRouter):
    """Serve's power of two choices, with a hedge skipping its first call's replica.

    Out of order (no ``FIFOMixin``): the replica chosen for a request is the one it gets,
    so a hedge cannot be handed the replica another request's round chose. Admission is
    Loom's (``limits.max_queued``), so replicas rarely refuse and FIFO order buys nothing.
    """

    def initialize_state(self, **kwargs: Any) -> None:
        self._first_replica: OrderedDict[str, ReplicaID] = OrderedDict()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        ids: Set[ReplicaID] = self.apply_locality_routing(pending_request=pending_request)
        # this node's replicas first, then all: should_backoff marks the round over all
        widest = pending_request is None or pending_request.routing_context.should_backoff
        ids = hedge_candidates(ids, self._avoid(pending_request), widest=widest)
        if not ids:
            return []
        chosen = random.sample(list(ids), k=min(2, len(ids)))
        return [[self._replicas[replica_id] for replica_id in chosen]]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: object
    ) -> None:
        group = pending_request.metadata.session_id
        if group.startswith(HEDGE_GROUP_PREFIX) and group not in self._first_replica:
            self._first_replica[group] = replica_id
            if len(self._first_replica) > REMEMBERED_GROUPS:
                self._first_replica.popitem(last=False)

    def _avoid(self, pending_request: PendingRequest | None) -> ReplicaID | None:
        if pending_request is None:
            return None
        return self._first_replica.get(pending_request.metadata.session_id)
