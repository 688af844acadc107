"""Reading a request body safely: size limit, UTF-8, JSON, then a pydantic schema.

Every failure is an ``ApiError`` with a message a client can act on; nothing here raises
anything else, so a bad body can never become a 500.
"""

from __future__ import annotations

from typing import TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from serving.gateway.errors import ApiError, bad_request

M = TypeVar("M", bound=BaseModel)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refused with 413 as soon as it passes ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise bad_request("Content-Length is not a number") from None
        if declared_bytes > max_bytes:
            raise _too_large(declared_bytes, max_bytes)
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise _too_large(received, max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


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
