"""The ensemble router: scatter one request to every member, gather under a deadline and a
quorum, hedge stragglers, combine (the scatter/gather pattern, ch. 8).

Each member gets its own direct handle call (not the gateway's ``Coalescer``, so a call can
be cancelled), counted in flight on the member's version app (``routes.tracking``) so a
rollout still drains. A member that has not answered after its hedge delay
(``serving.ensemble.hedge_delay_s``) gets a duplicate call: both carry one hedge group
(``serving.hedge_routing``), so the member's router sends the duplicate to a replica other
than the first call's. The first answer wins; the other call is cancelled
(``DeploymentResponse.cancel()``).

    router = EnsembleRouter("digits", config.model("digits"), gateway_core)
    answer = await router.infer(inference_request)   # EnsembleAnswer, or ApiError 504
    answer.decision.partial, answer.decision.answered
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from serving import metrics
from serving.ensemble import (
    ANSWERED,
    GatherDecision,
    LatencyWindow,
    MemberOutcome,
    combine_embeddings,
    combine_probabilities,
    decide_quorum,
    hedge_delay_s,
)
from serving.errors import ApiError, InputRefused, Overloaded, bad_request
from serving.faults import InjectedFault
from serving.hedge_routing import hedge_group
from serving.request import ClassifyReply, EmbedReply, InferenceRequest, pack_inputs

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from serving.config import ModelConfig
    from serving.gateway import GatewayCore

PARTIAL_HEADER = "x-loom-ensemble-partial"


@dataclass(frozen=True, slots=True)
class MemberAnswer:
    """One member's reply, and whether a hedge was sent and won for it."""

    reply: ClassifyReply | EmbedReply
    hedged: bool
    hedge_won: bool


@dataclass(frozen=True, slots=True)
class EnsembleAnswer:
    """The combined output and who made it."""

    output: np.ndarray
    """(n, classes) probabilities, or (n, dim) embeddings."""
    decision: GatherDecision
    versions: dict[str, str]
    """Member -> the version of it that answered."""
    hedged: tuple[str, ...]
    """Members a duplicate call was sent to."""
    hedge_won: tuple[str, ...]
    """Members whose duplicate answered first."""
    token_counts: tuple[int, ...] = ()
    """Embeddings: tokens per input (the first answered member's tokenizer)."""

    @property
    def version(self) -> str:
        """``digits-mlp@1+digits-cnn@3``: the member versions that answered."""
        return "+".join(f"{m}@{v}" for m, v in self.versions.items())

    def parameters(self) -> dict[str, Any]:
        """What the v2 response's ``parameters`` say about the gather."""
        d = self.decision
        return {
            "partial": d.partial,
            "answered": list(d.answered),
            "failed": dict(d.failed),
            "timed_out": list(d.timed_out),
            "hedged": list(self.hedged),
        }

    def headers(self) -> dict[str, str]:
        return {PARTIAL_HEADER: "true" if self.decision.partial else "false"}


def failure_reason(exc: BaseException) -> str:
    """A short reason for a 504's message and the answer's ``failed``: not a traceback."""
    if isinstance(exc, InjectedFault):
        return "injected fault"
    if isinstance(exc, Overloaded):
        return "overloaded"
    if isinstance(exc, ApiError):
        return exc.message
    return type(exc).__name__


async def _result(response: Awaitable[Any]) -> Any:
    return await response


class EnsembleRouter:
    """Serves one ensemble entry (``ModelConfig.ensemble``) through ``gw``'s member routes."""

    def __init__(self, name: str, model: ModelConfig, gw: GatewayCore) -> None:
        assert model.ensemble is not None
        self.name = name
        self.model = model
        self.config = model.ensemble
        self.members = model.ensemble.members
        self._gw = gw
        self._policy = model.ensemble.hedge_policy
        self._latencies = {m: LatencyWindow() for m in self.members}
        self._dims: dict[str, int] = {}

    # ---- one request -------------------------------------------------------------------------

    async def infer(self, request: InferenceRequest) -> EnsembleAnswer:
        """Scatter, gather until every member answered or the deadline, decide, combine.
        Quorum missed -> ``ApiError(504)`` naming each member that failed or timed out."""
        payload = pack_inputs(list(request.inputs)) if self.model.task == "classify" else None
        if payload is None:
            payload = list(request.inputs)
        wait_s = min(self.config.deadline_ms / 1000.0, request.deadline_s - time.time())
        tasks = {
            m: asyncio.ensure_future(self._call_member(m, payload, request.shard_key))
            for m in self.members
        }
        _, pending = await asyncio.wait(tasks.values(), timeout=max(wait_s, 0.0))
        for task in pending:
            task.cancel()  # its finally cancels the member's calls
        outcomes: dict[str, MemberOutcome] = {}
        answers: dict[str, MemberAnswer] = {}
        for member, task in tasks.items():
            if task in pending:
                outcomes[member] = MemberOutcome("timed_out")
            elif (exc := task.exception()) is not None:
                if isinstance(exc, InputRefused):  # the request, not the member, is at fault
                    raise bad_request(exc.message, param="inputs")
                outcomes[member] = MemberOutcome("failed", failure_reason(exc))
            else:
                outcomes[member] = ANSWERED
                answers[member] = task.result()
        decision = decide_quorum(self.members, outcomes, self.config.needed)
        for member, outcome in outcomes.items():
            metrics.ENSEMBLE_MEMBER_OUTCOMES.labels(self.name, member, outcome.kind).inc()
        if not decision.met:
            raise ApiError(
                504,
                f"ensemble {self.name} needs {self.config.needed} of {len(self.members)} "
                f"members within {wait_s * 1000:.0f} ms; only {len(decision.answered)} "
                f"answered: {decision.missing_text()}",
                code="quorum_not_met",
            )
        return await self._combine(decision, answers)

    async def _combine(
        self, decision: GatherDecision, answers: dict[str, MemberAnswer]
    ) -> EnsembleAnswer:
        replies = {m: answers[m].reply for m in decision.answered}
        common = {
            "decision": decision,
            "versions": {m: r.version for m, r in replies.items()},
            "hedged": tuple(m for m in self.members if m in answers and answers[m].hedged),
            "hedge_won": tuple(m for m in self.members if m in answers and answers[m].hedge_won),
        }
        if self.model.task == "classify":
            outputs = {m: r.probabilities for m, r in replies.items()}
            combined = combine_probabilities(outputs, self.config.combine, self.config.weights)
            return EnsembleAnswer(output=combined, **common)
        vectors = {m: r.vectors for m, r in replies.items()}
        for member, block in vectors.items():
            self._dims[member] = block.shape[1]
        dims = {m: await self._dim(m) for m in self.members if m not in vectors}
        combined = combine_embeddings(vectors, self.members, {**self._dims, **dims})
        first = replies[decision.answered[0]]
        return EnsembleAnswer(output=combined, token_counts=first.token_counts, **common)

    async def _dim(self, member: str) -> int:
        """A missing member's width, for its block of zeros: seen before, or its info."""
        if member not in self._dims:
            try:
                info = await asyncio.wait_for(self._gw.model_info(member), 2.0)
            except Exception:
                raise ApiError(
                    503,
                    f"ensemble {self.name}: member {member} has not answered yet, so the "
                    "width of its part of the embedding is unknown",
                    code="model_not_ready",
                    headers={"Retry-After": "1"},
                ) from None
            self._dims[member] = int(info["dim"])
        return self._dims[member]

    # ---- one member --------------------------------------------------------------------------

    async def _call_member(self, member: str, payload: Any, shard_key: str = "") -> MemberAnswer:
        """Call ``member``; hedge it per the policy; the first answer wins, the rest are
        cancelled (here, or in ``finally`` when the gather gives up on this member).
        ``shard_key`` places the call on a member sharded by header."""
        route = self._gw.route(member, shard_key)
        handle = route.handle
        if self._policy.enabled:  # the duplicate, if sent, skips the first call's replica
            handle = handle.options(session_id=hedge_group())
        send = self._sender(handle)
        responses: list[Any] = []
        tasks: list[asyncio.Future] = []
        sent_s: list[float] = []

        def launch() -> asyncio.Future:
            sent_s.append(time.perf_counter())
            response = send(payload)
            responses.append(response)
            tasks.append(asyncio.ensure_future(_result(response)))
            return tasks[-1]

        with self._gw.routes.tracking(route.app_name):
            try:
                launch()
                delay_s = hedge_delay_s(self._policy, self._latencies[member])
                if delay_s is not None:
                    done, _ = await asyncio.wait(tasks, timeout=delay_s)
                    if not done:
                        launch()
                        metrics.ENSEMBLE_HEDGES.labels(self.name, member).inc()
                winner = await self._first_answer(tasks)
                # the winning call's own time, from its own send: a won hedge counted from the
                # first send would add the hedge delay to the window, raise the p95, and so
                # the next delay (a feedback loop); a cancelled straggler is not counted
                self._latencies[member].add(time.perf_counter() - sent_s[tasks.index(winner)])
                hedge_won = len(tasks) > 1 and tasks.index(winner) == 1
                if hedge_won:
                    metrics.ENSEMBLE_HEDGE_WINS.labels(self.name, member).inc()
                return MemberAnswer(winner.result(), hedged=len(tasks) > 1, hedge_won=hedge_won)
            finally:
                for response, task in zip(responses, tasks, strict=True):
                    if task.done():
                        _ = task.cancelled() or task.exception()  # a loser's error: retrieved
                    else:
                        task.cancel()
                        with contextlib.suppress(Exception):
                            response.cancel()

    @staticmethod
    async def _first_answer(tasks: list[asyncio.Future]) -> asyncio.Future:
        """The first call to answer; an error counts only when every call failed (then the
        first call's error is raised)."""
        waiting = set(tasks)
        while waiting:
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:  # first call first, when both answered in one wake-up
                if task in done and task.exception() is None:
                    return task
        raise tasks[0].exception() or tasks[-1].exception()  # type: ignore[misc]

    def _sender(self, handle: DeploymentHandle) -> Callable[[Any], Any]:
        if self.model.task == "classify":
            return lambda rows: handle.classify.remote(rows)
        return lambda texts: handle.embed.remote(texts)

    # ---- metadata and readiness --------------------------------------------------------------

    async def ready(self) -> bool:
        """Ready when ``quorum`` members are: an answer can be given."""
        gw = self._gw
        ready = [await gw.readiness.model_ready(gw.routed_name(m)) for m in self.members]
        return sum(ready) >= self.config.needed

    def metadata(self, first_member_meta: dict) -> dict:
        """v2 model metadata: the first member's tensors (every member takes the same input),
        the ensemble's platform, and its members and combine in ``parameters``."""
        return {
            **first_member_meta,
            "name": self.name,
            "versions": ["ensemble"],
            "platform": "loom-ensemble-" + self.model.task,
            "parameters": {
                "members": list(self.members),
                "combine": self.config.combine,
                "quorum": self.config.needed,
                "deadline_ms": self.config.deadline_ms,
            },
        }


def ensemble_routers(gw: GatewayCore) -> dict[str, EnsembleRouter]:
    """A router per ensemble entry of ``gw``'s config."""
    return {
        m.name: EnsembleRouter(m.name, m, gw) for m in gw.config.models if m.ensemble is not None
    }
