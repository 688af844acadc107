"""Errors that reach a client, and how each protocol shapes them.

Handlers raise ``ApiError``; the gateway renders it in the shape of the protocol the route
belongs to: OpenAI ``{"error": {"message", "type", "param", "code"}}`` under ``/v1``, Open
Inference Protocol v2 ``{"error": "..."}`` under ``/v2``. Body problems (malformed JSON, bad
UTF-8, schema violations, empty input) are 400 in both protocols; size limits are 413.

What a replica or a router answers with (``serving.messages``' ``ReplicaError``s, the
ensemble's ``QuorumNotMet``) becomes an ``ApiError`` in one place, ``api_error``: an overload
is 503 with Retry-After, a refused input 400, a missed deadline 504. Anything else is a bug:
the endpoint wrapper answers 500 and logs it with the request id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from starlette.responses import Response

from serving.messages import (
    ColdStart,
    DeadlineExceeded,
    GenerationFailed,
    GenerationRefused,
    InjectedFault,
    InputRefused,
    Overloaded,
    ReplicaUnavailable,
    RequestTooLarge,
)
from serving.routing.ensemble_router import MemberWidthUnknown, QuorumNotMet

Protocol = Literal["openai", "v2"]
JSON = "application/json"

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    421: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    503: "overloaded_error",
    504: "timeout_error",
}


# not frozen: Starlette's handler sets ``exc.__traceback__ = None`` after rendering one, which a
# frozen dataclass refuses (FrozenInstanceError, a 500); eq=False keeps identity hashing
@dataclass(eq=False)
class ApiError(Exception):
    status: int
    message: str
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"


def protocol_for_path(path: str) -> Protocol:
    return "v2" if path == "/v2" or path.startswith("/v2/") else "openai"


def error_body(error: ApiError, protocol: Protocol) -> bytes:
    if protocol == "v2":
        return json.dumps({"error": error.message}).encode()
    body = {
        "error": {
            "message": error.message,
            "type": _OPENAI_TYPES.get(error.status, "api_error"),
            "param": error.param,
            "code": error.code,
        }
    }
    return json.dumps(body).encode()


def error_response(error: ApiError, path: str) -> Response:
    return Response(
        error_body(error, protocol_for_path(path)),
        status_code=error.status,
        media_type=JSON,
        headers=error.headers,
    )


def bad_request(
    message: str, *, param: str | None = None, code: str = "invalid_request"
) -> ApiError:
    return ApiError(400, message, code=code, param=param)


def model_not_found(name: str) -> ApiError:
    return ApiError(404, f"model '{name}' does not exist", code="model_not_found", param="model")


def model_not_ready(name: str, reason: str | None = None) -> ApiError:
    """No version of the model is routed yet (it is starting, or ``reason``: the version or
    alias its source waits for is not in the store yet): retry later."""
    return ApiError(
        503,
        f"model '{name}' has no version ready yet" + (f": {reason}" if reason else ""),
        code="model_not_ready",
        headers={"Retry-After": "1"},
    )


COLD_START_S = 5
"""Retry-After for a request that waited out its deadline on a model scaled to zero: a
replica is starting (a small model's replica takes ~5 s here)."""


def deadline_exceeded(model: str) -> ApiError:
    """The request's deadline passed before an answer came (504)."""
    return ApiError(504, f"model {model} did not answer within the deadline", code="timeout")


# Where each task is served: the hint in the 400 a model gets on a route not for its task.
TASK_ROUTES = {
    "embed": "POST /v1/embeddings or POST /v2/models/{name}/infer",
    "classify": "POST /v2/models/{name}/infer",
    "generate": "POST /v1/completions or POST /v1/chat/completions",
}


def wrong_route(name: str, task: str, route: str) -> ApiError:
    where = TASK_ROUTES.get(task)
    hint = f"; use {where.format(name=name)}" if where else ""
    return bad_request(
        f"model '{name}' is a {task} model, which {route} does not serve{hint}",
        param="model",
        code="wrong_model_task",
    )


def api_error(exc: BaseException) -> ApiError | None:
    """The client's answer to what a replica or router raised; None for anything else (a bug:
    500). One place, so a status means the same on every route."""
    # built from the fields, never str(exc): through Ray, str() is the remote traceback
    if isinstance(exc, Overloaded):
        message = f"model {exc.model} is overloaded; retry after {exc.retry_after_s} s"
        return ApiError(
            503, message, code="overloaded", headers={"Retry-After": str(exc.retry_after_s)}
        )
    if isinstance(exc, InputRefused):
        return bad_request(exc.message, param="inputs")
    if isinstance(exc, GenerationRefused):
        return bad_request(exc.message, param=exc.param)
    if isinstance(exc, RequestTooLarge):  # more than a request's share: never servable whole
        return ApiError(413, exc.message, code="request_too_large", param=exc.param)
    # .message, not str(exc): through Ray, str() is the remote traceback (pids, reprs)
    if isinstance(exc, GenerationFailed):  # one sequence's fault; the replica logged it
        return ApiError(500, exc.message, code="generation_failed")
    if isinstance(exc, ReplicaUnavailable):  # its generation loop died; Serve replaces it
        return ApiError(503, exc.message, code="replica_unavailable", headers={"Retry-After": "1"})
    if isinstance(exc, InjectedFault):  # config ``faults``: on purpose, so retry-able
        return ApiError(
            503, f"model {exc.model} failed the call (injected fault)", code="injected_fault"
        )
    if isinstance(exc, ColdStart):
        return ApiError(
            503, exc.message, code="model_starting", headers={"Retry-After": str(COLD_START_S)}
        )
    if isinstance(exc, DeadlineExceeded):
        return deadline_exceeded(exc.model)
    if isinstance(exc, QuorumNotMet):
        return ApiError(504, str(exc), code="quorum_not_met")
    if isinstance(exc, MemberWidthUnknown):
        return ApiError(503, str(exc), code="model_not_ready", headers={"Retry-After": "1"})
    return None
