"""One wrapper for every gateway route: authorise, give the request its id, run the handler,
answer errors in the route's protocol, count and time the answer.

A route family registers its handlers through ``Endpoints``; a handler takes a ``Scope`` (the
Starlette request, its request id, the caller (principal and scopes, checked against the
route's scope in ``scopes.ROUTE_SCOPES`` before the handler runs), and the model label it sets
once it knows the model is one of ours, so an unknown name never becomes a metric label) and
returns a response:

    endpoints = Endpoints(app, core)

    @endpoints.post("/v1/embeddings", "embeddings")
    async def embeddings(scope: Scope) -> Response:
        scope.model = "minilm"
        ...

An ``ApiError`` (or a replica's refusal, ``errors.api_error``) is answered in the route's
protocol, and logged once with the request id when it is a 5xx (a 503, a 504); any other
exception is a bug: answered 500 in the protocol's shape, logged once with the request id and
its traceback. Every answer carries ``x-request-id`` and is counted
in ``loom_requests_total`` by model, route and status, 500s included.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from serving import metrics
from serving.gateway.body import BODY_READ_TIMEOUT_S
from serving.gateway.browser_guard import BrowserGuard
from serving.gateway.core import GatewayCore
from serving.gateway.errors import ApiError, api_error, error_response
from training.callers import LOCAL_CALLER, Caller

logger = logging.getLogger(__name__)

AUDITED_ROUTES = frozenset({"admin_promote", "admin_reshard"})
"""The gateway's own state-changing routes: each call is a line of the audit log (the jobs
routes write theirs from ``training.api``)."""
ANONYMOUS = "-"
"""The principal of an audit line whose key was missing or wrong."""
REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_CHARS = 128
VERSION_HEADER = "x-loom-model-version"
"""The model version that answered: during a rollout or a canary split it varies."""


def request_id(given: str | None, prefix: str = "") -> str:
    """The one request-id rule: the client's ``X-Request-Id`` when it has 1 to 128
    characters, else a new one (``prefix`` + 32 hex digits, e.g. ``cmpl-3f2a...``)."""
    if given and len(given) <= MAX_REQUEST_ID_CHARS:
        return given
    return prefix + uuid.uuid4().hex


@dataclass(slots=True)
class Scope:
    """One request as a handler sees it."""

    request: Request
    request_id: str
    arrived_s: float
    """When it arrived (``time.time()``): its deadline counts from here."""
    model: str = ""
    """The ``model`` label of the request's metrics; set once the name is known to be ours."""
    caller: Caller = LOCAL_CALLER
    """Who is calling (principal and scopes); a route with ``auth=False`` is ``LOCAL_CALLER``."""

    def path_param(self, name: str) -> str:
        return str(self.request.path_params[name])


Handler = Callable[[Scope], Awaitable[Response]]


class Endpoints:
    """Registers a route family's handlers on ``app``, each wrapped once (module docstring)."""

    def __init__(self, app: FastAPI, core: GatewayCore) -> None:
        self._app = app
        self._core = core
        self._guard = BrowserGuard.of(core.config.server)

    def get(
        self, path: str, route: str, *, auth: bool = True, counted: bool = True
    ) -> Callable[[Handler], Handler]:
        return self.add("GET", path, route, auth=auth, counted=counted)

    def post(
        self, path: str, route: str, *, id_prefix: str = "", tensor_body: bool = False
    ) -> Callable[[Handler], Handler]:
        """A POST route reading a JSON body; ``tensor_body``: a v2 infer body, which may also
        come as the binary tensor extension or with no Content-Type (``browser_guard``)."""
        return self.add(
            "POST", path, route, id_prefix=id_prefix, json_body=True, tensor_body=tensor_body
        )

    def add(
        self,
        method: str,
        path: str,
        route: str,
        *,
        auth: bool = True,
        counted: bool = True,
        id_prefix: str = "",
        json_body: bool = False,
        tensor_body: bool = False,
    ) -> Callable[[Handler], Handler]:
        """Register ``METHOD path`` (``route`` names it in metrics). Health and metrics routes
        take ``auth=False, counted=False`` (probes and scrapes are not traffic, and skip the
        Host rule of ``browser_guard``); ``id_prefix`` starts the ids made for requests that
        bring none; ``json_body`` routes refuse a Content-Type other than JSON (415)."""

        def register(handler: Handler) -> Handler:
            async def endpoint(request: Request) -> Response:
                return await self._run(
                    handler,
                    request,
                    route,
                    auth=auth,
                    counted=counted,
                    id_prefix=id_prefix,
                    json_body=json_body,
                    tensor_body=tensor_body,
                )

            self._app.add_route(path, endpoint, methods=[method], name=route)
            return handler

        return register

    async def _run(
        self,
        handler: Handler,
        request: Request,
        route: str,
        *,
        auth: bool,
        counted: bool,
        id_prefix: str,
        json_body: bool,
        tensor_body: bool,
    ) -> Response:
        started = time.perf_counter()
        # the body's deadline under any ingress (``body.read_body``)
        state = request.scope.setdefault("state", {})
        state[BODY_READ_TIMEOUT_S] = self._core.config.server.body_read_timeout_s
        given_id = request.headers.get(REQUEST_ID_HEADER)
        scope = Scope(request, request_id(given_id, id_prefix), time.time())
        principal = ANONYMOUS if auth else scope.caller.principal  # until the key is known
        try:
            if auth:  # Host, Origin and Content-Type first: a web page gets no further
                self._guard.check(request, json_body=json_body, tensor_body=tensor_body)
                scope.caller = self._core.authenticate(request)
                principal = scope.caller.principal
                self._core.permit(scope.caller, route)
            response = await handler(scope)
        except Exception as exc:
            error = exc if isinstance(exc, ApiError) else api_error(exc)
            if error is None:  # a bug: the client gets a 500, the operator the traceback
                logger.exception(
                    "request %s (%s): %s %s failed",
                    scope.request_id,
                    scope.caller.principal,
                    request.method,
                    request.url.path,
                )
                error = ApiError(500, f"internal error ({type(exc).__name__})")
            elif error.status >= 500:  # every 5xx is in the log with its request id
                logger.warning(
                    "request %s (%s): %s %s answered %d: %s",
                    scope.request_id,
                    scope.caller.principal,
                    request.method,
                    request.url.path,
                    error.status,
                    error.message,
                )
            response = error_response(error, request.url.path)
        response.headers[REQUEST_ID_HEADER] = scope.request_id
        if route in AUDITED_ROUTES and self._core.audit is not None:
            target = str(request.path_params.get("name", ""))
            status = str(response.status_code)
            self._core.audit.record(principal, route, target, status, request_id=scope.request_id)
        if not counted:
            return response
        status = str(response.status_code)
        metrics.REQUESTS.labels(scope.model, route, status).inc()
        metrics.REQUEST_LATENCY.labels(scope.model, route).observe(time.perf_counter() - started)
        return response
