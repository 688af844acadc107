"""Reading a request body safely: size limit, deadline, UTF-8, JSON, then a pydantic schema.

Every failure is an ``ApiError`` with a message a client can act on; nothing here raises
anything else, so a bad body can never become a 500.

The body's deadline: the gateway's HTTP server (``http_server``) cuts a body that is not in
within ``server.body_read_timeout_s`` of its headers, answers 408 itself and marks the request
(``READ_TIMED_OUT`` in its state); the route reading it then sees the client gone. Behind Ray
Serve's proxy (``ingress: proxy``) that server is not in the path, so ``read_body`` keeps a
deadline of its own, the request's ``BODY_READ_TIMEOUT_S`` (the endpoint wrapper sets it).
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from serving.gateway.errors import ApiError, bad_request

M = TypeVar("M", bound=BaseModel)

READ_TIMED_OUT = "loom_read_timed_out"
"""Key in a request's ASGI ``state``: True once the HTTP server cut its body for time."""
BODY_READ_TIMEOUT_S = "loom_body_read_timeout_s"
"""Key in a request's ASGI ``state``: seconds ``read_body`` waits for the whole body."""
CLIENT_GONE = 499
"""The status counted for a request whose client left before its body was in (nginx's
"client closed request"); nobody receives it."""


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refused with 413 as soon as it passes ``max_bytes``, 408 when it is not
    all in within the request's ``BODY_READ_TIMEOUT_S``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise bad_request("Content-Length is not a number") from None
        if declared_bytes > max_bytes:
            raise _too_large(declared_bytes, max_bytes)
    timeout_s: float | None = request.scope.get("state", {}).get(BODY_READ_TIMEOUT_S)
    chunks: list[bytes] = []
    received = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_bytes:
                    raise _too_large(received, max_bytes)
                chunks.append(chunk)
    except TimeoutError:
        raise body_timed_out(timeout_s) from None
    except ClientDisconnect:
        raise client_gone(request) from None
    return b"".join(chunks)


def body_timed_out(timeout_s: float | None) -> ApiError:
    return ApiError(
        408,
        f"the request's body did not arrive within {timeout_s} s",
        code="body_timeout",
        headers={"Connection": "close"},  # the rest of the body is not worth reading
    )


def client_gone(request: Request) -> ApiError:
    """What a route answers (for its count; nobody receives it) when the body stopped: 408
    when the HTTP server cut it for time, else 499, the client left."""
    if request.scope.get("state", {}).get(READ_TIMED_OUT):
        return body_timed_out(request.scope["state"].get(BODY_READ_TIMEOUT_S))
    return ApiError(
        CLIENT_GONE,
        "the client closed the connection before its body arrived",
        code="client_closed_request",
    )


def _too_large(size: int, max_bytes: int) -> ApiError:
    return ApiError(
        413,
        f"request body of {size} bytes exceeds the limit of {max_bytes} bytes",
        code="body_too_large",
    )


def parse_json(body: bytes) -> object:
    if not body:
        raise bad_request("request body is empty; expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return orjson.loads(text)  # also refuses lone surrogates that json.loads lets through
    except orjson.JSONDecodeError as exc:
        raise bad_request(
            f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None


# pydantic tags a union member's error with the member's type: ("input", "str") -> "input"
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def field_path(loc: tuple[int | str, ...]) -> str:
    """The client's view of where an error is: ``inputs.0.datatype``, union tags left out."""
    parts = [str(p) for p in loc if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p))]
    return ".".join(parts)


def validate(model: type[M], data: object) -> M:
    """Check parsed JSON against a schema; the first problem names its field (``param``)."""
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = field_path(first["loc"])
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise bad_request(f"{where}: {first['msg']}{suffix}", param=where or None) from None
