"""A no-op HTTP server: answers every request with the same small JSON, so the load generator
can be measured alone.

A bare ASGI app under uvicorn (httptools and uvloop when installed): no framework, no
routing, no work, so its answer rate bounds what the load generator can drive.

    python -m benchmarks.noop_server --port 8123
    curl -X POST 127.0.0.1:8123/v1/embeddings -d '{}'   # -> {"ok":true}
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

BODY = b'{"ok":true}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
MAX_BODY_MESSAGES = 10_000


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """ASGI: 200 with ``BODY`` to any HTTP request, after reading its body to the end."""
    if scope["type"] == "lifespan":
        for _ in range(2):  # startup, then shutdown
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
        return
    if scope["type"] != "http":
        return
    for _ in range(MAX_BODY_MESSAGES):
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            break
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
