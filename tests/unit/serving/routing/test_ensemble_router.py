"""The ensemble router over fake member handles, through the gateway's member lines: a
member past the deadline is left out (and its call cancelled), a failing one breaks or keeps
the quorum, a hedge's answer wins over a straggling first call, which is cancelled."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from serving.config import parse_config
from serving.gateway.core import GatewayCore
from serving.gateway.errors import api_error
from serving.messages import (
    ClassifyReply,
    Envelope,
    InferCall,
    InferenceRequest,
    InferReply,
    InjectedFault,
)
from serving.rollout.route_table import RouteFollower, RouteTable, VersionRoute
from serving.routing.ensemble_router import QuorumNotMet
from serving.routing.hedge_router import HEDGE_GROUP_PREFIX

MEMBERS = ("d-a", "d-b", "d-c")
ROW = np.full((1, 64), 3.0, dtype=np.float32)


class FakeResponse:
    """What ``handle.infer.remote`` gives: awaitable once, cancellable."""

    def __init__(self, delay_s: float, reply: ClassifyReply | None) -> None:
        self.delay_s, self.reply, self.cancelled = delay_s, reply, False

    async def _run(self) -> InferReply[ClassifyReply]:
        await asyncio.sleep(self.delay_s)
        if self.reply is None:
            raise InjectedFault("member")
        return InferReply(self.reply)

    def __await__(self):
        return self._run().__await__()

    def cancel(self) -> None:
        self.cancelled = True


class FakeMember:
    """A member's handle: its n-th call waits ``delays_s[n]`` (the last one repeats); each
    call's session id (``handle.options(session_id=...)``, the hedge group) is kept."""

    def __init__(self, probabilities: list[float], delays_s: list[float], fails: bool = False):
        self.probabilities, self.delays_s, self.fails = probabilities, delays_s, fails
        self.calls: list[FakeResponse] = []
        self.sessions: list[str] = []
        self._session = ""
        self.infer = self  # handle.infer.remote(call)

    def options(self, *, session_id: str) -> FakeMember:
        self._session = session_id
        return self

    def remote(self, call: InferCall) -> FakeResponse:
        delay = self.delays_s[min(len(self.calls), len(self.delays_s) - 1)]
        reply = ClassifyReply(np.array([self.probabilities] * len(call)), "1")
        self.calls.append(FakeResponse(delay, None if self.fails else reply))
        self.sessions.append(self._session)
        return self.calls[-1]


def gateway(members: dict[str, FakeMember], **section: object) -> GatewayCore:
    loom = parse_config(
        {
            "models": [
                *({"name": m, "source": m, "task": "classify"} for m in MEMBERS),
                {
                    "name": "digits",
                    "task": "classify",
                    "ensemble": {"members": list(MEMBERS), "combine": "mean", **section},
                },
            ]
        }
    )
    follower = RouteFollower(lambda *_: None)
    follower.table = RouteTable(
        1, {m: (VersionRoute(m, "1", 1.0, f"loom.{m}@1", h),) for m, h in members.items()}
    )
    return GatewayCore(loom, follower, store=None)


def request() -> InferenceRequest:
    return InferenceRequest("digits", (ROW[0],), Envelope("r-1", deadline_s=time.time() + 60))


def test_a_member_past_the_deadline_is_left_out_flagged_and_its_call_cancelled():
    slow = FakeMember([0.0, 0.0, 1.0], delays_s=[30.0])
    members = {"d-a": FakeMember([1.0, 0, 0], [0]), "d-b": FakeMember([0.5, 0.5, 0], [0]),
               "d-c": slow}  # fmt: skip
    gw = gateway(members, deadline_ms=100, quorum=2)

    answer = asyncio.run(gw.ensembles["digits"].infer(request()))

    assert (answer.decision.partial, answer.decision.answered) == (True, ("d-a", "d-b"))
    assert answer.decision.timed_out == ("d-c",)
    assert np.allclose(answer.output, [[0.75, 0.25, 0.0]])  # mean of the two that answered
    assert slow.calls[0].cancelled
    assert answer.headers() == {"x-loom-ensemble-partial": "true"}
    assert gw.routes.busy() == {}  # nothing left counted in flight


def test_a_failing_member_keeps_quorum_two_but_breaks_quorum_three_with_a_504_naming_it():
    def members() -> dict[str, FakeMember]:
        return {"d-a": FakeMember([1.0, 0, 0], [0]), "d-b": FakeMember([1.0, 0, 0], [0]),
                "d-c": FakeMember([1.0, 0, 0], [0], fails=True)}  # fmt: skip

    answer = asyncio.run(gateway(members(), quorum=2).ensembles["digits"].infer(request()))
    assert answer.decision.failed == {"d-c": "injected fault"}
    assert answer.parameters()["partial"] is True

    with pytest.raises(QuorumNotMet) as refused:
        asyncio.run(gateway(members(), quorum=3).ensembles["digits"].infer(request()))
    error = api_error(refused.value)
    assert error is not None
    assert (error.status, error.code) == (504, "quorum_not_met")
    assert "needs 3 of 3" in str(refused.value)
    assert "d-c failed (injected fault)" in str(refused.value)


def test_a_hedge_answers_for_a_straggler_and_the_straggling_call_is_cancelled():
    straggler = FakeMember([0, 1.0, 0], delays_s=[30.0, 0.0])  # first call slow, hedge fast
    members = {"d-a": FakeMember([0, 1.0, 0], [0]), "d-b": straggler,
               "d-c": FakeMember([0, 1.0, 0], [0])}  # fmt: skip
    gw = gateway(members, deadline_ms=5000, hedge_after_ms=20)

    answer = asyncio.run(gw.ensembles["digits"].infer(request()))

    assert answer.decision.partial is False  # everyone answered, within the deadline
    assert (answer.hedged, answer.hedge_won) == (("d-b",), ("d-b",))
    assert len(straggler.calls) == 2
    assert straggler.calls[0].cancelled
    assert not straggler.calls[1].cancelled
    assert len(members["d-a"].calls) == 1  # answered inside 20 ms: never hedged
    # the call and its duplicate share one hedge group, so the duplicate skips the first
    # call's replica (serving.hedge_routing); another member's call is a group of its own
    first, duplicate = straggler.sessions
    assert first == duplicate
    assert first.startswith(HEDGE_GROUP_PREFIX)
    assert members["d-a"].sessions[0] not in (first, "")


def test_without_hedging_the_same_straggler_times_out():
    straggler = FakeMember([0, 1.0, 0], delays_s=[30.0, 0.0])
    members = {"d-a": FakeMember([0, 1.0, 0], [0]), "d-b": straggler,
               "d-c": FakeMember([0, 1.0, 0], [0])}  # fmt: skip
    gw = gateway(members, deadline_ms=200, quorum=2)

    answer = asyncio.run(gw.ensembles["digits"].infer(request()))

    assert answer.decision.timed_out == ("d-b",)
    assert len(straggler.calls) == 1
    assert straggler.sessions == [""]  # no hedging: no group, Serve's own routing
