"""Errors that reach a client, and how each protocol shapes them.

Handlers raise ``ApiError``; the gateway renders it in the shape of the protocol the route
belongs to: OpenAI ``{"error": {"message", "type", "param", "code"}}`` under ``/v1``, Open
Inference Protocol v2 ``{"error": "..."}`` under ``/v2``. Body problems (malformed JSON, bad
UTF-8, schema violations, empty input) are 400 in both protocols; size limits are 413.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

Protocol = Literal["openai", "v2"]

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
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


class Overloaded(Exception):
    """A model server's admission queue is full; retry after ``retry_after_s``."""

    def __init__(self, model: str, retry_after_s: int) -> None:
        super().__init__(f"model {model} is overloaded; retry after {retry_after_s} s")
        self.model = model
        self.retry_after_s = retry_after_s

    def __reduce__(self):  # survives the hop back through Ray
        return (Overloaded, (self.model, self.retry_after_s))


class InputRefused(Exception):
    """A replica refused a request's inputs (the gateway answers 400). The gateway checks
    inputs against the model's current version first; a replica still checks, since a canary
    version may take another shape."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # survives the hop back through Ray
        return (InputRefused, (self.message,))


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


def bad_request(
    message: str, *, param: str | None = None, code: str = "invalid_request"
) -> ApiError:
    return ApiError(400, message, code=code, param=param)


def model_not_found(name: str) -> ApiError:
    return ApiError(404, f"model '{name}' does not exist", code="model_not_found", param="model")


def model_not_ready(name: str) -> ApiError:
    """No version of the model is routed yet (it is starting): retry shortly."""
    return ApiError(
        503,
        f"model '{name}' has no version ready yet",
        code="model_not_ready",
        headers={"Retry-After": "1"},
    )


def overloaded(exc: Overloaded) -> ApiError:
    return ApiError(
        503,
        str(exc),
        code="overloaded",
        headers={"Retry-After": str(exc.retry_after_s)},
    )
