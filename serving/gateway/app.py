"""The gateway's HTTP app: every route family mounted over one ``GatewayCore``, and the
error handlers that keep every answer in its protocol's shape (never a bare 500 page).

Route families live in ``serving.gateway.routes``, one module per family; each registers its
handlers through ``Endpoints`` (``serving.gateway.endpoint``), which authorises, counts and
logs them all one way. A new family is a module there and one line here.

    app = build_http_app(core)     # a FastAPI app: served by HttpServer, or Serve's proxy
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from serving.gateway.body import client_gone
from serving.gateway.browser_guard import BrowserGuard
from serving.gateway.core import GatewayCore
from serving.gateway.endpoint import REQUEST_ID_HEADER, VERSION_HEADER, Endpoints
from serving.gateway.errors import ApiError, error_response
from serving.gateway.protocols.v2 import SERVER_VERSION
from serving.gateway.rate_limit import RateLimitMiddleware
from serving.gateway.routes.admin import add_admin_routes
from serving.gateway.routes.ensembles import add_ensemble_routes
from serving.gateway.routes.generation import add_generation_routes
from serving.gateway.routes.inference import add_inference_routes
from serving.gateway.routes.jobs import add_jobs_routes
from serving.gateway.routes.monitoring import add_monitoring_routes
from serving.gateway.routes.openapi import add_openapi_route

logger = logging.getLogger(__name__)


def build_http_app(gw: GatewayCore) -> FastAPI:
    """Every HTTP route of Loom, over ``gw``."""
    app = FastAPI(
        title="Loom", version=SERVER_VERSION, docs_url=None, redoc_url=None, openapi_url=None
    )
    _add_error_handlers(app)
    _add_cors(app, BrowserGuard.of(gw.config.server).cors_allow_origins)
    limiter = gw.rate_limiter  # shared with the gRPC server: one bucket per client
    if limiter.enabled:  # inside CORS: a refused request still carries its CORS headers
        identify = gw.keys.identify if gw.keys.on else None  # per principal, else address
        app.add_middleware(RateLimitMiddleware, limiter=limiter, identify=identify)
    endpoints = Endpoints(app, gw)
    add_generation_routes(endpoints, gw)
    add_ensemble_routes(endpoints, gw)  # literal /v2/models/<ensemble>/... before the generic
    add_inference_routes(endpoints, gw)
    add_admin_routes(endpoints, gw)
    add_jobs_routes(app, gw)
    add_monitoring_routes(endpoints, gw)
    add_openapi_route(endpoints, app, gw, SERVER_VERSION)  # last: it lists every route
    return app


def _add_cors(app: FastAPI, origins: frozenset[str]) -> None:
    """CORS for exactly ``server.cors_allow_origins``; none at all when it is empty (no
    Access-Control-* header, and a preflight is a 405: nothing is allowed). Bearer keys, not
    cookies: no credentials mode."""
    if not origins:
        return
    app.add_middleware(
        CORSMiddleware,
        allow_origins=sorted(origins),
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-Id"],
        expose_headers=[REQUEST_ID_HEADER, VERSION_HEADER, "Retry-After"],
        max_age=600,
    )


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        if exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        error = ApiError(exc.status_code, message, code="route_error")
        return error_response(error, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        error = ApiError(400, f"invalid request: {exc.errors()[0]['msg']}")
        return error_response(error, request.url.path)

    @app.exception_handler(ClientDisconnect)
    async def on_client_gone(request: Request, exc: ClientDisconnect) -> Response:
        # a body cut for time or left half-sent (a route outside the endpoint wrapper, the
        # jobs router, read it): not a bug, and nobody is there to read the answer
        return error_response(client_gone(request), request.url.path)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # a bug outside the endpoint wrapper (the jobs router): the client gets no trace,
        # the log gets it
        logger.error(
            "request %s: %s %s failed",
            request.headers.get(REQUEST_ID_HEADER, "-"),
            request.method,
            request.url.path,
            exc_info=exc,
        )
        error = ApiError(500, f"internal error ({type(exc).__name__})")
        return error_response(error, request.url.path)
