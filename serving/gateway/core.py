"""GatewayCore: what every route shares, and no route of its own.

Auth (bearer keys), the model table (which names are served, by what config), placement
(the version a request goes to by the route table's weights, a pool member through its
pool's app, a sharded model's shard by the ring), in-flight tracking (so the rollout
reconciler drains a version before deleting it), one coalescer per model version, and the
members' lines an ensemble router scatters over. The HTTP routes live in
``serving.gateway.routes``, one module per family, each taking a ``GatewayCore``.

    core = GatewayCore(config, follower, store, jobs)
    envelope = core.envelope("r-1", request.headers, arrived_s)  # deadline: arrival + timeout
    rows = await core.infer(InferenceRequest("minilm", ("hello",), envelope))
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request

from models.store import ModelStore
from serving import metrics
from serving.audit import AuditLog
from serving.config import EnsembleEntry, LoomConfig, ModelConfig, ServedEntry
from serving.gateway.coalescer import Coalescer
from serving.gateway.errors import ApiError, model_not_found, model_not_ready
from serving.gateway.keys import KeyCheck
from serving.gateway.rate_limit import RateLimiter
from serving.gateway.readiness import ReadinessCache
from serving.gateway.scopes import require_scope, route_family
from serving.messages import (
    ClassifyReply,
    ColdStart,
    DeadlineExceeded,
    EmbedReply,
    Envelope,
    InferCall,
    InferenceRequest,
    ModelInfo,
    ReplicaUnavailable,
)
from serving.rollout.route_table import NotRouted, RouteFollower, VersionRoute
from serving.routing.ensemble_router import EnsembleRouter, MemberLine, Sent
from serving.routing.shard_router import ShardRouter
from serving.routing.sharding import SHARD_KEY_HEADER, parse_shard_entry, shard_key
from training.api import JobsService
from training.callers import LOCAL_CALLER, Caller

logger = logging.getLogger(__name__)

WARM_TIMEOUT_S = 5.0
CALLS_PER_REPLICA = 4
"""Calls a coalescer keeps out per replica of a version: the replica's batcher merges what
queues behind its running batch. Measured at concurrency 8: 2 per replica ~70 req/s, 4 ~90,
8 ~73 (more calls, more hop cost); at 64 the three were within noise (~180-235)."""


T = TypeVar("T")

REPLICA_LOST: tuple[type[Exception], ...] = (
    RayActorError,
    DeploymentUnavailableError,
    ReplicaUnavailable,
)
"""What a call raises when the replica answering it died or went away (its process was
killed, its node lost) or is going (a generation replica whose loop died refuses every call
and exits): not the request's fault, and an idempotent call may go again."""


def lost_reason(lost: Exception) -> str:
    """``loom_retries_total``'s reason: the replica died, or it refused as it goes."""
    return "replica_unavailable" if isinstance(lost, ReplicaUnavailable) else "replica_lost"


def model_unavailable(model: str) -> ApiError:
    """503: the call was lost with its replica twice (or had no time left to go again)."""
    return ApiError(
        503,
        f"model '{model}' is unavailable: its replica was lost; retry shortly",
        code="model_unavailable",
        headers={"Retry-After": "1"},
    )


async def send_once_more_if_lost(
    model: str,
    envelopes: Sequence[Envelope],
    send: Callable[[], Awaitable[T]],
    *,
    retry: bool = True,
) -> T:
    """``send()``; if its replica is lost, once more (Serve's router has marked the dead
    replica, so the second goes to another one) while any of ``envelopes`` (the requests the
    call carries) has time left. Only for a call that may run twice: embed and classify
    calls, a greedy or seeded completion, a stream that has sent nothing yet. ``retry``
    False: a lost replica is a 503 at once."""
    try:
        return await send()
    except REPLICA_LOST as lost:
        ids = [envelope.request_id for envelope in envelopes]
        if not retry or all(envelope.expired() for envelope in envelopes):
            logger.warning("model %s: replica lost (%r) under requests %s", model, lost, ids)
            if isinstance(lost, ReplicaUnavailable):
                raise  # its own 503, which says why the replica went
            raise model_unavailable(model) from lost
        logger.warning(
            "model %s: replica lost (%r) under requests %s; sending once more", model, lost, ids
        )
        metrics.RETRIES.labels(model, lost_reason(lost)).inc()
    try:
        return await send()
    except REPLICA_LOST as lost_again:
        logger.warning(
            "model %s: replica lost again (%r) under requests %s", model, lost_again, ids
        )
        raise model_unavailable(model) from lost_again


class ShardBoard(Protocol):
    """Resharding requests, to the reconciler (``rollout.route_table.BoardShardRequests``)."""

    async def request(self, model: str, count: int) -> int | None: ...

    async def requested(self) -> dict[str, int]: ...


class _Line:
    """An open line to one member's version app: ``send`` calls it (``routing.Members``)."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    def send(self, call: InferCall) -> Sent:
        sent: Sent = self._handle.infer.remote(call)
        return sent


class GatewayCore:
    """What every route shares: auth, the model table, placement, deadlines, in-flight
    tracking, one coalescer per model version. It knows no routes."""

    def __init__(
        self,
        config: LoomConfig,
        routes: RouteFollower,
        store: ModelStore | None,
        jobs: JobsService | None = None,
        shard_board: ShardBoard | None = None,
        keys: KeyCheck | None = None,
        audit: AuditLog | None = None,
        sidecars: Callable[[], Awaitable[list[dict[str, str]]]] | None = None,
        advertised_address: str | None = None,
    ) -> None:
        """``routes`` picks each request's model version (``rollout.route_table``); ``store``
        is the model store the admin routes move aliases in; ``jobs``, when given, serves the
        ``/v1/jobs`` routes (``training.api``); ``shard_board`` takes resharding requests to
        the reconciler; ``keys`` are the key digests (default: the config's keys, hashed
        here; the gateway deployment is given digests only, ``gateway.keys``); ``audit``, when
        given, takes a line per state-changing call (``serving.audit``); ``sidecars`` lists the
        monitoring sidecars and ``advertised_address`` is where Prometheus reaches this
        gateway (``GET /v1/admin/targets``)."""
        self.config = config
        self.sidecars = sidecars
        self.advertised_address = advertised_address
        self.audit = audit
        self.jobs = jobs
        server = config.server
        self._keys = keys if keys is not None else KeyCheck.hashing(server)
        # one set of buckets for every transport: a client's HTTP and gRPC calls share them
        self.rate_limiter = RateLimiter(server.rate_limits)
        self.max_body_bytes = server.max_body_bytes
        self.timeout_s = server.request_timeout_s
        self.routes = routes
        self.store = store
        # one coalescer per version app and model (a pool's app serves several members): a
        # call joins requests for one version of one model only
        self._coalescers: dict[tuple[str, str], Coalescer[Any]] = {}
        self._info: dict[tuple[str, str], ModelInfo] = {}  # (app, model) -> info()
        self.members = config.pool_members()  # member -> its pool: the routed entry
        self._member_handles: dict[tuple[str, str], DeploymentHandle] = {}
        sharded = {m.name: m.sharding for m in config.deployed() if m.sharding is not None}
        self.shards = ShardRouter(sharded, lambda: self.routes.table)
        self.shard_board = shard_board
        self.readiness = ReadinessCache(
            [m.name for m in config.deployed()], routes.weights, waiting=routes.waiting
        )
        self.created_s = int(time.time())
        self.ensembles = {m.name: EnsembleRouter(m, self) for m in config.ensembles()}

    # ---- auth --------------------------------------------------------------------------------

    @property
    def keys(self) -> KeyCheck:
        """The key digests requests are checked against (``on`` False: the keyless mode)."""
        return self._keys

    def authenticate(self, request: Request) -> Caller:
        """The caller the request's bearer key names; 401 for none, an empty one or a wrong
        one. With no keys configured: ``LOCAL_CALLER`` (every scope; 127.0.0.1 only)."""
        return self.authenticate_header(request.headers.get("authorization"))

    def authenticate_header(self, authorization: str | None) -> Caller:
        """``authenticate`` for the value of an ``authorization`` header (HTTP) or metadata
        entry (gRPC): ``Bearer <key>``."""
        if not self._keys.on:
            return LOCAL_CALLER
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                code="missing_api_key",
            )
        caller = self._keys.identify(token)
        if caller is None:
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        return caller

    def authorize(self, request: Request, route: str) -> Caller:
        """``authenticate``, then ``permit``."""
        caller = self.authenticate(request)
        self.permit(caller, route)
        return caller

    def permit(self, caller: Caller, route: str) -> None:
        """403 ``insufficient_scope`` unless ``caller`` holds the scope ``route`` needs
        (``scopes.ROUTE_SCOPES``); counted per principal either way."""
        metrics.REQUESTS_BY_PRINCIPAL.labels(caller.principal, route_family(route)).inc()
        require_scope(caller, route)

    # ---- the model table ---------------------------------------------------------------------

    def model(self, name: str) -> ServedEntry:
        """The config a callable name is served by (a pool member's: its pool's settings);
        404 for an unknown name or a pool's own name."""
        model = self.config.served(name)
        if model is None:
            raise model_not_found(name)
        return model

    def plain_model(self, name: str) -> ModelConfig:
        """``model(name)`` for a route that an ensemble does not serve (404 for one)."""
        model = self.model(name)
        if isinstance(model, EnsembleEntry):
            raise model_not_found(name)
        return model

    def routed_name(self, name: str) -> str:
        """The route-table entry serving ``name``: its pool for a member, else itself."""
        member = self.members.get(name)
        return member.pool if member else name

    # ---- placement ---------------------------------------------------------------------------

    def envelope(
        self,
        request_id: str,
        headers: Mapping[str, str],
        arrived_s: float | None = None,
        *,
        client_timeout_s: float | None = None,
    ) -> Envelope:
        """A request's envelope: its id, its deadline (``server.request_timeout_s`` after it
        arrived, ``time.time()`` then; default now; sooner when the client gives a shorter
        ``client_timeout_s``, a gRPC call's deadline) and the client's shard key
        (``X-Loom-Shard-Key``, in HTTP headers or gRPC metadata)."""
        shard_header = headers.get(SHARD_KEY_HEADER) or ""
        start_s = time.time() if arrived_s is None else arrived_s
        timeout_s = self.timeout_s
        if client_timeout_s is not None:
            timeout_s = min(timeout_s, client_timeout_s)
        return Envelope(request_id, start_s + timeout_s, shard_header)

    def route(self, name: str, envelope: Envelope) -> VersionRoute:
        """The version one request of model ``name`` goes to; 503 while none is routed. A pool
        member goes to its pool's app, the handle naming the member (``multiplexed_model_id``).
        A sharded entry goes to the shard its ring gives the request's key (``shard_key``)."""
        return self._for_member(name, self.routes.pick, envelope, count=True)

    def _for_member(
        self,
        name: str,
        pick: Callable[[str], VersionRoute],
        envelope: Envelope | None = None,
        *,
        count: bool = False,
    ) -> VersionRoute:
        """``count``: a request goes there (``loom_shard_requests_total``), not a lookup."""
        member = self.members.get(name)
        routed = member.pool if member else name
        sharding = self.shards.sharded.get(routed)
        try:
            if sharding is None:
                route = pick(routed)
            else:
                key = shard_key(
                    sharding,
                    model=name,
                    header=envelope.shard_key if envelope else None,
                    request_id=envelope.request_id if envelope else "",
                )
                entry = self.shards.entry(routed, key)
                if entry is None:
                    raise NotRouted(routed, self.routes.waiting_for(routed))
                route = pick(entry)
                if count and (placed := parse_shard_entry(entry)) is not None:
                    metrics.SHARD_REQUESTS.labels(*placed).inc()  # (model, shard)
        except NotRouted as exc:
            raise model_not_ready(name, exc.reason) from None
        if member is None:
            if sharding is not None:  # the shard's route, under the name clients call
                return VersionRoute(name, route.version, route.weight, route.app_name, route.handle)
            return route
        key_ = (route.app_name, name)
        handle = self._member_handles.get(key_)
        if handle is None:
            handle = route.handle.options(multiplexed_model_id=member.ref)
            self._member_handles[key_] = handle
        # the app stays the pool's: in-flight tracking (and so draining) is per app
        return VersionRoute(name, route.version, route.weight, route.app_name, handle)

    # ---- inference ---------------------------------------------------------------------------

    async def infer(self, request: InferenceRequest) -> EmbedReply | ClassifyReply:
        """The rows of one embed or classify request, joined with its neighbours into one call
        (``Coalescer``); ``DeadlineExceeded`` once the envelope's deadline passes."""
        route = self.route(request.model, request.envelope)
        coalescer = self._coalescer_for(route)
        remaining_s = request.envelope.remaining_s()
        try:
            # counted in flight until answered: the reconciler deletes an old version only
            # once no gateway has a request left on it
            with self.routes.tracking(route.app_name):
                rows = await asyncio.wait_for(
                    coalescer.submit(request.envelope, request.inputs), remaining_s
                )
        except TimeoutError:
            if await self.readiness.without_replicas(request.model):
                raise ColdStart(request.model, request.envelope.request_id) from None
            raise DeadlineExceeded(request.model, request.envelope.request_id) from None
        if not isinstance(rows, EmbedReply | ClassifyReply):
            raise TypeError(f"model {request.model} answered {type(rows).__name__}")
        return rows

    def _coalescer_for(self, route: VersionRoute) -> Coalescer[Any]:
        key = (route.app_name, route.model)
        coalescer = self._coalescers.get(key)
        if coalescer is None:
            live = self.routes.app_names()  # forget versions no longer routed
            for old in [k for k in self._coalescers if k[0] not in live]:
                del self._coalescers[old]  # its queued requests still finish
            for old in [k for k in self._member_handles if k[0] not in live]:
                del self._member_handles[old]
            model = self.plain_model(route.model)
            handle = route.handle
            wait_ms = model.limits.max_queue_wait_ms

            def send(infer_call: InferCall) -> Any:
                return handle.infer.remote(infer_call)

            async def call(infer_call: InferCall, name: str = route.model) -> Any:
                envelopes = [part.envelope for part in infer_call.parts]
                return await send_once_more_if_lost(name, envelopes, lambda: send(infer_call))

            coalescer = Coalescer(
                call=call,
                max_batch_inputs=model.batching.max_batch_size,
                max_in_flight=CALLS_PER_REPLICA * model.max_replicas,
                # one more round of full calls may wait here; past that the replicas are full
                max_waiting_inputs=CALLS_PER_REPLICA
                * model.max_replicas
                * model.batching.max_batch_size,
                # the replica's wait budget holds here too, where shedding costs no hop
                max_wait_s=None if wait_ms is None else wait_ms / 1000,
                on_shed=metrics.REJECTED.labels(route.model).inc,
                model=route.model,
            )
            self._coalescers[key] = coalescer
        return coalescer

    async def model_info(self, name: str) -> ModelInfo:
        """The replica info of the version that takes most of ``name``'s traffic."""
        route = self._for_member(name, self.routes.primary)
        key = (route.app_name, route.model)
        if key not in self._info:
            self._info[key] = await route.handle.info.remote()
        return self._info[key]

    async def warm(self, route: VersionRoute) -> None:
        """Before a new version is routed: its first call sets up the handle (so the first
        request does not), and its info is cached. Bounded: the follower waits for it."""
        try:
            info = await asyncio.wait_for(route.handle.info.remote(), WARM_TIMEOUT_S)
        except Exception as exc:  # its requests will say why; the rollout goes on
            logger.warning("warming %s failed: %r", route.app_name, exc)
            return
        self._info[(route.app_name, route.model)] = info

    # ---- the ensembles' lines to their members (``routing.ensemble_router.Members``) ---------

    @contextlib.contextmanager
    def member_line(
        self, member: str, envelope: Envelope, *, group: str | None
    ) -> Iterator[MemberLine]:
        route = self.route(member, envelope)
        handle = route.handle if group is None else route.handle.options(session_id=group)
        with self.routes.tracking(route.app_name):
            yield _Line(handle)

    async def member_info(self, member: str) -> ModelInfo:
        return await self.model_info(member)

    async def member_ready(self, member: str) -> bool:
        return await self.readiness.model_ready(self.routed_name(member))
