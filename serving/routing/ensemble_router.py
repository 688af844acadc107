"""The ensemble router: scatter one request to every member, gather under a deadline and a
quorum, hedge stragglers, combine (the scatter/gather pattern, ch. 8).

Each member gets its own call (not the gateway's coalescer, so a call can be cancelled),
opened through ``Members``, the narrow interface the gateway gives the router: a member
call is counted in flight on the member's version app while open, so a rollout still
drains. A member that has not answered after its hedge delay
(``serving.routing.ensemble.hedge_delay_s``) gets a duplicate call: both carry one hedge
group (``serving.routing.hedge_router``), so the member's router sends the duplicate to a
replica other than the first call's. The first answer wins; the other call is cancelled.

    router = EnsembleRouter(config.model("digits"), members)
    answer = await router.infer(inference_request)   # EnsembleAnswer, or QuorumNotMet
    answer.decision.partial, answer.decision.answered
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Generator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import numpy as np

from serving import metrics
from serving.config.model import EnsembleEntry
from serving.messages import (
    ClassifyReply,
    DeadlineExceeded,
    EmbedReply,
    Envelope,
    InferCall,
    InferenceRequest,
    InferReply,
    InjectedFault,
    InputRefused,
    ModelInfo,
    Overloaded,
)
from serving.routing.ensemble import (
    ANSWERED,
    GatherDecision,
    LatencyWindow,
    MemberOutcome,
    combine_embeddings,
    combine_probabilities,
    decide_quorum,
    hedge_delay_s,
)
from serving.routing.hedge_router import hedge_group

MEMBER_INFO_TIMEOUT_S = 2.0
T = TypeVar("T")


class Sent(Protocol):
    """One call in flight (a Serve ``DeploymentResponse``): awaited once, or cancelled."""

    def __await__(self) -> Generator[Any, None, InferReply[Any]]: ...

    def cancel(self) -> None: ...


class MemberLine(Protocol):
    """An open line to one member's version: ``send`` makes a call there."""

    def send(self, call: InferCall) -> Sent: ...


class Members(Protocol):
    """What the router needs of the gateway, and no more."""

    def member_line(
        self, member: str, envelope: Envelope, *, group: str | None
    ) -> AbstractContextManager[MemberLine]:
        """A line to the version of ``member`` that ``envelope`` is placed on, counted in
        flight while open; calls on it with a ``group`` are one hedge group (their replicas
        differ)."""
        ...

    async def member_info(self, member: str) -> ModelInfo:
        """The member's replica ``info()``."""
        ...

    async def member_ready(self, member: str) -> bool: ...


class QuorumNotMet(Exception):
    """Fewer members answered than the quorum needs (the gateway answers 504)."""


class MemberWidthUnknown(Exception):
    """A concat ensemble's missing member has never answered, so the width of its block of
    zeros is unknown (the gateway answers 503, retry-able)."""


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
    if isinstance(exc, DeadlineExceeded):
        return "deadline passed"
    message = getattr(exc, "message", None)  # the gateway's own refusals carry one
    return message if isinstance(message, str) and message else type(exc).__name__


async def _result(response: Awaitable[InferReply[Any]]) -> InferReply[Any]:
    return await response


def _rows(reply: object, kind: type[T]) -> T:
    if not isinstance(reply, kind):
        raise TypeError(f"a member answered {type(reply).__name__}, not {kind.__name__}")
    return reply


class EnsembleRouter:
    """Serves one ensemble entry through ``members``, the gateway's lines to its members."""

    def __init__(self, model: EnsembleEntry, members: Members) -> None:
        self.name = model.name
        self.model = model
        self.config = model.ensemble
        self.members = model.ensemble.members
        self._lines = members
        self._policy = model.ensemble.hedge_policy
        self._latencies = {m: LatencyWindow() for m in self.members}
        self._dims: dict[str, int] = {}

    # ---- one request -------------------------------------------------------------------------

    async def infer(self, request: InferenceRequest) -> EnsembleAnswer:
        """Scatter, gather until every member answered or the deadline, decide, combine.
        Quorum missed -> ``QuorumNotMet`` naming each member that failed or timed out; inputs
        a member refuses -> ``InputRefused`` (the request is at fault, not the member)."""
        envelope = request.envelope
        # the gather's deadline is the ensemble's or the request's, whichever comes first;
        # each member call carries it, so a member does not compute past it either
        wait_s = min(self.config.deadline_ms / 1000.0, envelope.remaining_s())
        gather = replace(envelope, deadline_s=time.time() + wait_s)
        call = InferCall.join([(gather, request.inputs)])
        tasks = {m: asyncio.ensure_future(self._call_member(m, call)) for m in self.members}
        _, pending = await asyncio.wait(tasks.values(), timeout=max(wait_s, 0.0))
        for task in pending:
            task.cancel()  # its finally cancels the member's calls
        outcomes: dict[str, MemberOutcome] = {}
        answers: dict[str, MemberAnswer] = {}
        for member, task in tasks.items():
            if task in pending:
                outcomes[member] = MemberOutcome("timed_out")
            elif (exc := task.exception()) is not None:
                if isinstance(exc, InputRefused):
                    raise exc
                outcomes[member] = MemberOutcome("failed", failure_reason(exc))
            else:
                outcomes[member] = ANSWERED
                answers[member] = task.result()
        decision = decide_quorum(self.members, outcomes, self.config.needed)
        for member, outcome in outcomes.items():
            metrics.ENSEMBLE_MEMBER_OUTCOMES.labels(self.name, member, outcome.kind).inc()
        if not decision.met:
            raise QuorumNotMet(
                f"ensemble {self.name} needs {self.config.needed} of {len(self.members)} "
                f"members within {wait_s * 1000:.0f} ms; only {len(decision.answered)} "
                f"answered: {decision.missing_text()}"
            )
        return await self._combine(decision, answers)

    async def _combine(
        self, decision: GatherDecision, answers: dict[str, MemberAnswer]
    ) -> EnsembleAnswer:
        replies = {m: answers[m].reply for m in decision.answered}
        versions = {m: r.version for m, r in replies.items()}
        hedged = tuple(m for m in self.members if m in answers and answers[m].hedged)
        won = tuple(m for m in self.members if m in answers and answers[m].hedge_won)
        if self.model.task == "classify":
            outputs = {m: _rows(r, ClassifyReply).probabilities for m, r in replies.items()}
            if self.config.combine == "concat":
                raise ValueError("combine concat serves embeddings, not probabilities")
            combined = combine_probabilities(outputs, self.config.combine, self.config.weights)
            return EnsembleAnswer(combined, decision, versions, hedged, won)
        embeds = {m: _rows(r, EmbedReply) for m, r in replies.items()}
        for member, reply in embeds.items():
            self._dims[member] = reply.vectors.shape[1]
        dims = {m: await self._dim(m) for m in self.members if m not in embeds}
        vectors = {m: r.vectors for m, r in embeds.items()}
        combined = combine_embeddings(vectors, self.members, {**self._dims, **dims})
        first = embeds[decision.answered[0]]
        return EnsembleAnswer(combined, decision, versions, hedged, won, first.token_counts)

    async def _dim(self, member: str) -> int:
        """A missing member's width, for its block of zeros: seen before, or its info."""
        if member not in self._dims:
            try:
                info = await asyncio.wait_for(
                    self._lines.member_info(member), MEMBER_INFO_TIMEOUT_S
                )
            except Exception:
                raise MemberWidthUnknown(
                    f"ensemble {self.name}: member {member} has not answered yet, so the "
                    "width of its part of the embedding is unknown"
                ) from None
            dim = info.get("dim")
            if dim is None:
                raise MemberWidthUnknown(
                    f"ensemble {self.name}: member {member} reports no embedding width"
                )
            self._dims[member] = dim
        return self._dims[member]

    # ---- one member --------------------------------------------------------------------------

    async def _call_member(self, member: str, call: InferCall) -> MemberAnswer:
        """Call ``member``; hedge it per the policy; the first answer wins, the rest are
        cancelled (here, or in ``finally`` when the gather gives up on this member). The
        call's shard key places it on a member sharded by header."""
        # the duplicate, if sent, skips the first call's replica
        group = hedge_group() if self._policy.enabled else None
        responses: list[Sent] = []
        tasks: list[asyncio.Future[InferReply[Any]]] = []
        sent_s: list[float] = []
        with self._lines.member_line(member, call.parts[0].envelope, group=group) as line:

            def launch() -> None:
                sent_s.append(time.perf_counter())
                response = line.send(call)
                responses.append(response)
                tasks.append(asyncio.ensure_future(_result(response)))

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
                reply = winner.result()
                if reply.rows is None:  # the member skipped it: the deadline passed first
                    raise DeadlineExceeded(member, call.parts[0].envelope.request_id)
                return MemberAnswer(reply.rows, hedged=len(tasks) > 1, hedge_won=hedge_won)
            finally:
                for response, task in zip(responses, tasks, strict=True):
                    if task.done():
                        _ = task.cancelled() or task.exception()  # a loser's error: retrieved
                    else:
                        task.cancel()
                        with contextlib.suppress(Exception):
                            response.cancel()

    @staticmethod
    async def _first_answer(
        tasks: list[asyncio.Future[InferReply[Any]]],
    ) -> asyncio.Future[InferReply[Any]]:
        """The first call to answer; an error counts only when every call failed (then the
        first call's error is raised)."""
        waiting = set(tasks)
        while waiting:
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:  # first call first, when both answered in one wake-up
                if task in done and task.exception() is None:
                    return task
        error = tasks[0].exception() or tasks[-1].exception()
        assert error is not None  # every call failed
        raise error

    # ---- metadata and readiness --------------------------------------------------------------

    async def ready(self) -> bool:
        """Ready when ``quorum`` members are: an answer can be given."""
        ready = [await self._lines.member_ready(m) for m in self.members]
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
