"""The gateway's ``inference.GRPCInferenceService``: the Open Inference Protocol v2 over gRPC,
each call taken the way HTTP's v2 routes take theirs.

One wrapper (``InferenceService._run``, the HTTP ``Endpoints`` wrapper's counterpart) gives
every call what an HTTP request gets, in the same order and from the same code:

- a request id: the ``x-request-id`` metadata entry when it has 1 to 128 characters, else a
  new one; sent back as trailing metadata;
- ``ModelInfer`` only: the ``infer`` family's rate limit (``server.rate_limits``), with the
  same buckets as HTTP (``GatewayCore.rate_limiter``): a client is its key's principal, else
  its address;
- auth: ``authorization: Bearer <key>`` metadata, checked as the header is
  (``GatewayCore.authenticate_header``), and the scope of the HTTP route of the same job
  (``v2_infer``, ``v2_model``, ``v2_ready``, ``v2_metadata``: ``infer``); ``ServerLive`` and
  ``ServerReady`` are health probes and need none, as ``/v2/health/*`` does not;
- the call's deadline: the client's (``grpc-timeout``), capped by ``server.request_timeout_s``,
  carried to the replica in the request's envelope; ``x-loom-shard-key`` metadata places it
  on a sharded model as the header does;
- errors: an ``ApiError`` (or a replica's refusal, ``errors.api_error``) as the status code
  of the same meaning (``v2_grpc.status_code``) with the HTTP error's message, Retry-After as
  ``retry-after`` trailing metadata, a 5xx logged once with the request id; anything else is a
  bug, INTERNAL naming the request id, logged once with its traceback;
- ``loom_requests_total`` and ``loom_request_duration_seconds``: the route ``grpc_<route>``
  (``grpc_v2_infer``), the status the same answer has over HTTP (200, 404, 503, ...).

What a call does between reading and answering is ``v2_service``'s, which HTTP calls too.

    service = InferenceService(core)
    add_GRPCInferenceServiceServicer_to_server(service, server)    # grpc_server does this
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from serving import metrics
from serving.gateway import v2_service
from serving.gateway.body import CLIENT_GONE
from serving.gateway.core import GatewayCore
from serving.gateway.endpoint import REQUEST_ID_HEADER, request_id
from serving.gateway.errors import ApiError, api_error, bad_request
from serving.gateway.protocols import grpc_predict_v2_messages_pb2 as pb
from serving.gateway.protocols import v2_grpc
from serving.gateway.rate_limit import client_key, rate_limited
from training.callers import LOCAL_CALLER, Caller

logger = logging.getLogger(__name__)

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]
METRICS_PREFIX = "grpc_"
"""A gRPC call's ``route`` label: its HTTP twin's route name after this (``grpc_v2_infer``)."""
INFER_ROUTE = "ModelInfer"
"""How a 400 for a model v2 infer does not serve names the call."""


@dataclass(slots=True)
class GrpcCall:
    """One call as a method sees it (the HTTP ``Scope``'s counterpart)."""

    context: Context
    metadata: Mapping[str, str]
    """The call's text metadata by (lower-case) key; binary (``-bin``) entries left out."""
    request_id: str
    arrived_s: float
    """When it arrived (``time.time()``): its deadline counts from here."""
    model: str = ""
    """The ``model`` label of its metrics; set once the name is known to be ours."""
    caller: Caller = LOCAL_CALLER
    trailing: dict[str, str] = field(default_factory=dict)
    """Trailing metadata sent with the answer (an ensemble's ``x-loom-ensemble-partial``)."""


def text_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    """The text entries of a call's metadata; the first of a repeated key wins."""
    found: dict[str, str] = {}
    for key, value in metadata or ():
        if isinstance(value, str) and not key.endswith("-bin"):
            found.setdefault(key.lower(), value)
    return found


def peer_host(peer: str) -> str | None:
    """The client's address in ``context.peer()``: ``ipv4:127.0.0.1:5000`` -> ``127.0.0.1``,
    ``ipv6:[::1]:5000`` -> ``::1`` (as HTTP sees a client: its rate-limit bucket)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rpartition(":")[0].strip("[]") or None
    return rest or None


def no_version(version: str) -> None:
    """Loom picks a request's version itself (its route table: rollouts, canary weights), as
    over HTTP, which has no per-version paths: a client naming one is told, not misled."""
    if version:
        raise bad_request(
            f"model_version {version!r} cannot be chosen: Loom routes each request to a "
            "version itself (rollouts, canaries); send model_version empty",
            param="model_version",
        )


class InferenceService:
    """The six methods of ``inference.GRPCInferenceService`` over one ``GatewayCore``."""

    def __init__(self, gw: GatewayCore) -> None:
        self._gw = gw
        self._identify = gw.keys.identify if gw.keys.on else None

    # ---- health and metadata -----------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> Any:
        async def live(call: GrpcCall) -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        return await self._run(context, "v2_live", live, auth=False, counted=False)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> Any:
        async def ready(call: GrpcCall) -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=await self._gw.readiness.all_ready())

        return await self._run(context, "v2_ready_all", ready, auth=False, counted=False)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> Any:
        async def metadata(call: GrpcCall) -> pb.ServerMetadataResponse:
            return v2_grpc.server_metadata_response(v2_service.server_metadata())

        return await self._run(context, "v2_metadata", metadata)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> Any:
        async def metadata(call: GrpcCall) -> pb.ModelMetadataResponse:
            model = self._gw.model(request.name)
            call.model = model.name
            no_version(request.version)
            meta = await v2_service.model_metadata(self._gw, model)
            return v2_grpc.model_metadata_response(meta)

        return await self._run(context, "v2_model", metadata)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> Any:
        async def ready(call: GrpcCall) -> pb.ModelReadyResponse:
            model = self._gw.model(request.name)
            call.model = model.name
            no_version(request.version)
            return pb.ModelReadyResponse(ready=await v2_service.model_ready(self._gw, model))

        return await self._run(context, "v2_ready", ready)

    # ---- inference ---------------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> Any:
        async def infer(call: GrpcCall) -> pb.ModelInferResponse:
            gw = self._gw
            model = gw.model(request.model_name)
            call.model = model.name
            v2_service.check_infer_task(model, INFER_ROUTE)
            no_version(request.model_version)
            body = v2_grpc.read_infer(request)
            envelope = gw.envelope(
                call.request_id,
                call.metadata,
                call.arrived_s,
                client_timeout_s=context.time_remaining(),
            )
            result = await v2_service.infer(gw, model, body, envelope, route=INFER_ROUTE)
            call.trailing.update(result.headers)
            return v2_grpc.infer_response(result, request_id=request.id)

        return await self._run(context, "v2_infer", infer, limited=True)

    # ---- the one wrapper ---------------------------------------------------------------------

    async def _run(
        self,
        context: Context,
        route: str,
        handler: Callable[[GrpcCall], Awaitable[T]],
        *,
        auth: bool = True,
        counted: bool = True,
        limited: bool = False,
    ) -> T:
        """Run ``handler`` as the module docstring says; ``route`` is the HTTP twin's name
        (its scope, and after ``grpc_`` its metrics label)."""
        started = time.perf_counter()
        metadata = text_metadata(context.invocation_metadata())
        call = GrpcCall(context, metadata, request_id(metadata.get(REQUEST_ID_HEADER)), time.time())
        status = 200
        try:
            try:
                if limited:
                    self._take_token(call)
                if auth:
                    call.caller = self._gw.authenticate_header(metadata.get("authorization"))
                    self._gw.permit(call.caller, route)
                answer = await handler(call)
            except asyncio.CancelledError:  # the client left, or its deadline passed
                status = CLIENT_GONE
                raise
            except Exception as exc:
                error = self._failure(exc, call, route)
                status = error.status
                trailing = {**call.trailing, **_lower(error.headers)}
                await context.abort(
                    v2_grpc.status_code(error),
                    error.message,
                    trailing_metadata=_trailing(call.request_id, trailing),
                )
            context.set_trailing_metadata(_trailing(call.request_id, call.trailing))
            return answer
        finally:
            if counted:
                label = METRICS_PREFIX + route
                metrics.REQUESTS.labels(call.model, label, str(status)).inc()
                metrics.REQUEST_LATENCY.labels(call.model, label).observe(
                    time.perf_counter() - started
                )

    def _take_token(self, call: GrpcCall) -> None:
        """429 when the client's ``infer`` bucket is empty (``rate_limit``)."""
        limiter = self._gw.rate_limiter
        if not limiter.enabled:
            return
        address = peer_host(call.context.peer())
        who = client_key(call.metadata.get("authorization"), address, self._identify)
        wait_s = limiter.wait_s("infer", who)
        if wait_s > 0:
            raise rate_limited("infer", wait_s)

    def _failure(self, exc: Exception, call: GrpcCall, route: str) -> ApiError:
        """The client's error for ``exc``; logged once when it is a 5xx (with the traceback
        when it is a bug)."""
        error = exc if isinstance(exc, ApiError) else api_error(exc)
        if error is None:
            logger.exception(
                "request %s (%s): gRPC %s failed", call.request_id, call.caller.principal, route
            )
            return ApiError(
                500, f"internal error ({type(exc).__name__}); request id {call.request_id}"
            )
        if error.status >= 500:
            logger.warning(
                "request %s (%s): gRPC %s answered %d: %s",
                call.request_id,
                call.caller.principal,
                route,
                error.status,
                error.message,
            )
        return error


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    """HTTP header names as gRPC metadata keys (lower-case only): ``Retry-After``."""
    return {name.lower(): value for name, value in headers.items()}


def _trailing(request_id: str, entries: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return ((REQUEST_ID_HEADER, request_id), *_lower(entries).items())
