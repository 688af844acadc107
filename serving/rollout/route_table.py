"""The route table: which version apps serve each model, published by the reconciler and read
by every gateway replica.

One small named Ray actor (``RouteBoard``) holds the newest table and an epoch that grows with
each publication. Each gateway replica runs a ``RouteFollower``: it long-polls the board with
the epoch it has (the board answers at once when a newer table exists, else after ``wait_s``),
applies a newer table between two requests, and with every poll reports its epoch and its
requests in flight per app. The reconciler deletes an old version only when every live
gateway reports the epoch that dropped it and nothing in flight there
(``rollout.gateways_caught_up``), so several gateway replicas all follow, and none is restarted.

    board = create_board("loom-routes")                 # the reconciler's process
    epoch = ray.get(board.publish.remote({"minilm": (VersionRoute("2", 1.0, app, handle),)}))
    follower = RouteFollower(board_poller(board))       # in a gateway replica
    follower.start(); route = follower.pick("minilm")   # -> VersionRoute for version "2"
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from serving.rollout.plan import GatewayReport, pick_version
from serving.routing.sharding import parse_shard_entry

logger = logging.getLogger(__name__)

BOARD_NAMESPACE = "loom"
"""Ray namespace of the board actor, so a gateway replica (in Serve's namespace) finds it."""

POLL_WAIT_S = 1.0
"""Longest a poll waits for a newer table: a gateway reports at least this often."""


@dataclass(frozen=True, slots=True)
class VersionRoute:
    """One version a model's requests may go to."""

    model: str
    version: str
    weight: float
    app_name: str
    handle: Any
    """The version app's ``DeploymentHandle`` (pickles to its name: cheap to publish)."""


@dataclass(frozen=True, slots=True)
class RouteTable:
    epoch: int
    routes: Mapping[str, tuple[VersionRoute, ...]]
    """Model -> the versions it routes to, heaviest first."""
    waiting: Mapping[str, str] = field(default_factory=dict)
    """Entry -> why it has no version to route yet, for one that is not routed because its
    source does not resolve in the store: ``"alias 'serving' of digits is not set yet"``.
    Said to clients in the 503 its requests get; no server paths in it."""


class StaleTerm(Exception):
    """A publish on behalf of a control-plane term that a newer one has replaced."""


class RouteBoard:
    """The actor body (``ray.remote(RouteBoard)``): the newest table and the gateways' reports."""

    def __init__(self) -> None:
        self._table = RouteTable(epoch=0, routes={})
        self._changed = asyncio.Event()
        self._reports: dict[str, tuple[int, dict[str, int], float]] = {}
        self._shard_requests: dict[str, int] = {}
        self._term = 0
        """The highest control-plane term (lease epoch) that has published: a fencing token."""

    async def publish(
        self,
        routes: Mapping[str, tuple[VersionRoute, ...]],
        waiting: Mapping[str, str] | None = None,
        term: int | None = None,
    ) -> int:
        """Replace the table; wake every waiting poll. Returns the new epoch. ``term``: the
        publishing reconciler's lease epoch; one older than a term that has published is
        refused (``StaleTerm``) and changes nothing: a reconciler that lost its role (paused,
        partitioned) cannot move traffic back."""
        if term is not None:
            if term < self._term:
                raise StaleTerm(f"route table: term {term} is over (term {self._term} publishes)")
            self._term = term
        self._table = RouteTable(
            epoch=self._table.epoch + 1, routes=dict(routes), waiting=dict(waiting or {})
        )
        self._changed.set()
        self._changed = asyncio.Event()
        return self._table.epoch

    async def poll(
        self, gateway_id: str, epoch: int, busy: dict[str, int], wait_s: float = POLL_WAIT_S
    ) -> RouteTable | None:
        """Record the gateway's report; return the table once newer than ``epoch``, or None
        after ``wait_s``."""
        self._reports[gateway_id] = (epoch, busy, time.monotonic())
        if self._table.epoch <= epoch:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait_s)
        return self._table if self._table.epoch > epoch else None

    async def table(self) -> RouteTable:
        return self._table

    async def request_shards(self, model: str, count: int) -> int | None:
        """Ask the reconciler to serve ``model`` as ``count`` shards (a gateway's admin route);
        returns the count asked for before, if any. The reconciler reads it on its next tick."""
        previous = self._shard_requests.get(model)
        self._shard_requests[model] = count
        return previous

    async def shard_requests(self) -> dict[str, int]:
        return dict(self._shard_requests)

    async def reports(self) -> dict[str, GatewayReport]:
        now = time.monotonic()
        return {
            gateway: GatewayReport(epoch=epoch, busy=busy, age_s=now - seen_s)
            for gateway, (epoch, busy, seen_s) in self._reports.items()
        }


def open_board(name: str) -> Any:
    """The board actor, started unless one runs (``get_if_exists``). Detached: it outlives
    the `loom serve` that started it, so when a standby takes the control plane over, the
    gateways keep following the same board and its epochs go on; the server that stops the
    stack kills it."""
    import ray

    actor_class = ray.remote(num_cpus=0, max_restarts=0)(RouteBoard)
    board = actor_class.options(
        name=name, namespace=BOARD_NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote()
    ray.get(board.table.remote())  # type: ignore[attr-defined]  # Ray types no actor methods
    return board


def waiting_by_model(waiting: Mapping[str, str]) -> dict[str, str]:
    """A table's ``waiting`` by model: a shard entry ``m~1`` is model ``m``'s (every shard of a
    model waits for the same source)."""
    folded: dict[str, str] = {}
    for entry, reason in sorted(waiting.items()):
        parsed = parse_shard_entry(entry)
        folded.setdefault(parsed[0] if parsed else entry, reason)
    return folded


Poller = Callable[[str, int, dict[str, int], float], Awaitable["RouteTable | None"]]


def board_poller(board: Any) -> Poller:
    """``poll`` against the board actor, awaited on the caller's event loop."""

    async def poll(
        gateway_id: str, epoch: int, busy: dict[str, int], wait_s: float
    ) -> RouteTable | None:
        table: RouteTable | None = await board.poll.remote(gateway_id, epoch, busy, wait_s)
        return table

    return poll


class NotRouted(LookupError):
    """The model has no version routed yet (it is starting, its first version failed, or its
    source does not resolve in the store: then ``reason`` says what is missing)."""

    def __init__(self, model: str, reason: str | None = None) -> None:
        super().__init__(model if reason is None else f"{model}: {reason}")
        self.model = model
        self.reason = reason


class RouteFollower:
    """A gateway replica's view of the route table: ``pick(model)`` chooses the version of one
    request (by weight), ``tracking(app)`` counts it in flight until it is answered.

    ``warm_up(route)``, awaited before a table with a new version is applied, lets the first
    request to that version find its handle ready (and may fetch its metadata).
    """

    def __init__(
        self,
        poll: Poller,
        *,
        warm_up: Callable[[VersionRoute], Awaitable[None]] | None = None,
        wait_s: float = POLL_WAIT_S,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self._poll = poll
        self.warm_up = warm_up
        self._wait_s = wait_s
        self._draw = draw
        self.gateway_id = uuid.uuid4().hex
        self.table = RouteTable(epoch=0, routes={})
        self._busy: Counter[str] = Counter()
        self._task: asyncio.Task | None = None

    # -- per request -------------------------------------------------------------------------

    def pick(self, model: str) -> VersionRoute:
        routes = self.table.routes.get(model)
        if not routes:
            raise NotRouted(model, self.table.waiting.get(model))
        if len(routes) == 1:
            return routes[0]
        return routes[pick_version([r.weight for r in routes], self._draw())]

    def primary(self, model: str) -> VersionRoute:
        """The heaviest version: the one metadata describes."""
        routes = self.table.routes.get(model)
        if not routes:
            raise NotRouted(model, self.table.waiting.get(model))
        return routes[0]

    @contextlib.contextmanager
    def tracking(self, app_name: str) -> Iterator[None]:
        self._busy[app_name] += 1
        try:
            yield
        finally:
            self._busy[app_name] -= 1
            if self._busy[app_name] <= 0:
                del self._busy[app_name]

    def busy(self) -> dict[str, int]:
        return dict(self._busy)

    def weights(self) -> dict[str, dict[str, float]]:
        """Model -> version -> weight, as this gateway routes now."""
        return {m: {r.version: r.weight for r in rs} for m, rs in self.table.routes.items()}

    def waiting(self) -> dict[str, str]:
        """Entry -> why it has no version yet, for each entry whose source does not resolve."""
        return dict(self.table.waiting)

    def waiting_for(self, model: str) -> str | None:
        """Why ``model`` (an entry, or a sharded model whose shards wait) has no version yet;
        None when it is not waiting for its source."""
        return waiting_by_model(self.table.waiting).get(model)

    def app_names(self) -> frozenset[str]:
        return frozenset(r.app_name for routes in self.table.routes.values() for r in routes)

    # -- following the board -----------------------------------------------------------------

    async def poll_once(self) -> bool:
        """One poll; apply a newer table. True if the table changed."""
        table = await self._poll(self.gateway_id, self.table.epoch, self.busy(), self._wait_s)
        if table is None or table.epoch <= self.table.epoch:
            return False
        if self.warm_up is not None:
            known = self.app_names()
            fresh = [
                r for routes in table.routes.values() for r in routes if r.app_name not in known
            ]
            # a version that will not warm is still routed: its requests then say why
            await asyncio.gather(*(self.warm_up(r) for r in fresh), return_exceptions=True)
        self.table = table
        return True

    async def run(self) -> None:
        """Follow the board until cancelled; a failed poll is retried after a second."""
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the board is gone (shutdown) or Ray hiccupped
                logger.warning("route table poll failed: %s", exc)
                await asyncio.sleep(1.0)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


class BoardShardRequests:
    """Resharding requests through the route board actor (``RouteBoard.request_shards``):
    the gateway's admin route asks, the reconciler in ``loom serve`` applies."""

    def __init__(self, board: Any) -> None:
        self._board = board

    async def request(self, model: str, count: int) -> int | None:
        return await self._board.request_shards.remote(model, count)

    async def requested(self) -> dict[str, int]:
        return await self._board.shard_requests.remote()
