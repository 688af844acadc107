"""The gateway's own HTTP server: uvicorn on the gateway replica's own event loop, guarded
against slow and greedy clients.

With ``server.ingress: direct`` the gateway replica serves HTTP itself, so a request reaches
Loom's handlers with no proxy hop and none of Ray Serve's per-request ingress layers (access
log, request wrapping, replica metrics). Measured here (no model, concurrency 64): ~3,600
req/s at 0.6 ms p50 at concurrency 1, against ~850 req/s and 1.6 ms through Serve's own direct
ingress and ~250 req/s and 9.4 ms through its proxy. A port already taken is an error, not a
silent share. It runs on the loop the replica's handle router runs on, so a call to a model
server and its answer cross no thread.

uvicorn alone holds a slow client forever: it arms its keep-alive timer only after an answer,
so a connection that never sends, a half-sent header and a body trickled a byte at a time all
stay open (seen here: over 40 s each), and it reads headers of any size (20 MB were taken).
``GuardedHttpProtocol`` adds what it lacks, per connection, from ``HttpLimits``:

- idle: a connection with no request under way (just opened, or kept alive after an answer)
  is closed after ``idle_timeout_s`` (uvicorn's keep-alive timer, armed at connect too);
- head: from a request's first byte its line and headers must be in within
  ``header_read_timeout_s``, and be at most ``max_header_bytes`` (else 408 or 431);
- body: from the end of its headers its whole body must be in within ``body_read_timeout_s``
  (else 408; the route reading it sees the client gone, ``body.read_body``);
- the cap: past ``max_connections`` open connections, a new one is answered 503 with
  Retry-After as soon as its headers are in, and closed; it never reaches a route.

Every refusal is JSON in the protocol's error shape of the request's path (``errors``), with
``Connection: close``. uvicorn's ``limit_concurrency`` is not used: it answers plain text,
only once headers are complete (a half-sent header is never refused), and counts idle
keep-alive connections as load. The key is in the headers, so none of this can ask for one:
the deadlines and the cap are what bound a client without a key.

    server = HttpServer(app, host="127.0.0.1", port=8000, limits=HttpLimits.of(config.server))
    await server.start()   # returns once the port is bound and serving, or raises why not
    await server.stop()

With ``ssl_context`` (``server_ssl_context``, from ``server.tls``) it serves HTTPS; the limits
above apply to the decrypted stream, after the TLS handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.config.server import ServerConfig
from serving.gateway.body import READ_TIMED_OUT
from serving.gateway.errors import JSON, ApiError, error_body, protocol_for_path

logger = logging.getLogger(__name__)


class PortUnavailable(RuntimeError):
    """The HTTP port is taken (or the address is not this machine's)."""


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortUnavailable(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def server_ssl_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server-side TLS context for the certificate chain in ``certfile`` and its key:
    TLS 1.2 at least, the library's default ciphers. Raises ``ssl.SSLError`` or ``OSError``
    for a file that is not a PEM certificate or key, or a key that does not match."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    return context


@dataclass(frozen=True, kw_only=True)
class HttpLimits:
    """How long and how many clients the server holds (``ServerConfig``'s fields of the same
    names say each one's contract)."""

    header_read_timeout_s: float = 10.0
    body_read_timeout_s: float = 30.0
    idle_timeout_s: int = 15
    max_connections: int = 1000
    max_header_bytes: int = 65536

    @classmethod
    def of(cls, server: ServerConfig) -> HttpLimits:
        return cls(
            header_read_timeout_s=server.header_read_timeout_s,
            body_read_timeout_s=server.body_read_timeout_s,
            idle_timeout_s=server.idle_timeout_s,
            max_connections=server.max_connections,
            max_header_bytes=server.max_header_bytes,
        )


Reading = Literal["idle", "head", "body"]


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with read deadlines, a header size limit and a connection
    cap (module docstring). ``HttpServer`` makes one subclass per server, which sets
    ``limits`` and its own ``admitted`` set."""

    limits: ClassVar[HttpLimits]
    admitted: ClassVar[set[GuardedHttpProtocol]]
    """The connections under the cap now, of this server."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading: Reading = "idle"
        self._read_timer: asyncio.TimerHandle | None = None
        self._over_cap = False
        self._answered = False  # refused here and closing: the parser's later calls are moot
        self._raw_head_bytes = 0

    # ---- the connection ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # not an isinstance check: uvloop's transports (the gateway replica's loop under Ray)
        # are not asyncio.Transport subclasses
        super().connection_made(cast(asyncio.Transport, transport))
        if len(self.admitted) >= self.limits.max_connections:
            self._over_cap = True  # answered 503 once its head is in; no longer than that
            self._start_reading("head", self.limits.header_read_timeout_s)
            return
        self.admitted.add(self)
        # uvicorn arms its keep-alive timer only after an answer: a fresh connection gets it too
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.admitted.discard(self)
        self._stop_reading()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return
        if self._reading == "idle":  # a request begins (even as bare CRLFs before its line)
            self._start_reading("head", self.limits.header_read_timeout_s)
        super().data_received(data)  # cancels the idle timer; the parser calls back below
        if self._reading == "head" and not self._answered:
            # the head is still not complete, so ``data`` was head (but for the end of a body
            # before it); a chunk that completes it is measured exactly in on_headers_complete
            self._raw_head_bytes += len(data)
            if self._raw_head_bytes > self.limits.max_header_bytes:
                self._refuse_head_too_large()

    # ---- the parser's calls ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._reading != "head":  # the next request on a kept-alive or pipelined connection
            self._start_reading("head", self.limits.header_read_timeout_s)

    def on_headers_complete(self) -> None:
        if self._answered:
            return
        head_bytes = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if head_bytes > self.limits.max_header_bytes:
            self._refuse_head_too_large()
            return
        if self._over_cap:  # a 5xx no route sees: logged here, by the client's address
            logger.warning(
                "%s: refused 503, the server holds its limit of %d connections",
                self._peer(),
                self.limits.max_connections,
            )
            self._answer_and_close(
                ApiError(
                    503,
                    f"the server holds its limit of {self.limits.max_connections} connections; "
                    "retry shortly",
                    code="too_many_connections",
                    headers={"Retry-After": "1"},
                )
            )
            return
        self._start_reading("body", self.limits.body_read_timeout_s)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._answered:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._answered:
            return
        self._stop_reading()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        """A request the parser cannot read (uvicorn answers plain text): 400 in shape."""
        self._answer_and_close(ApiError(400, f"malformed HTTP request: {msg}", code="bad_http"))

    # ---- deadlines and refusals --------------------------------------------------------------

    def _start_reading(self, part: Reading, timeout_s: float) -> None:
        self._stop_reading()
        self._reading = part
        self._raw_head_bytes = 0
        self._read_timer = self.loop.call_later(timeout_s, self._read_timed_out)

    def _stop_reading(self) -> None:
        self._reading = "idle"
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self._reading == "head":
            timeout_s = self.limits.header_read_timeout_s
            logger.info("%s: request headers not in within %s s; closed", self._peer(), timeout_s)
            self._answer_and_close(
                ApiError(
                    408,
                    f"the request's headers did not arrive within {timeout_s} s",
                    code="header_timeout",
                )
            )
            return
        timeout_s = self.limits.body_read_timeout_s
        logger.info("%s: request body not in within %s s; closed", self._peer(), timeout_s)
        cycle = self.cycle
        if cycle is None or cycle.response_started:  # answered without its body: just close
            self._answered = True
            self.transport.close()
            return
        # the route waits for the body: it sees the client gone (``body.read_body``), and its
        # answer is dropped; the client gets this one
        cycle.scope.setdefault("state", {})[READ_TIMED_OUT] = True
        cycle.disconnected = True
        cycle.message_event.set()
        self._answer_and_close(
            ApiError(
                408,
                f"the request's body did not arrive within {timeout_s} s",
                code="body_timeout",
            )
        )

    def _refuse_head_too_large(self) -> None:
        limit = self.limits.max_header_bytes
        logger.info("%s: request headers over %d bytes; closed", self._peer(), limit)
        self._answer_and_close(
            ApiError(431, f"the request's headers exceed {limit} bytes", code="headers_too_large")
        )

    def _answer_and_close(self, error: ApiError) -> None:
        """Write ``error`` in the shape of the request's path (as far as it arrived), close."""
        self._stop_reading()
        self._answered = True
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.disconnected:
            # a pipelined request's head came in behind an answer still under way: let that
            # answer finish, then close, rather than write into the middle of it
            cycle.keep_alive = False
            return
        target = getattr(self, "url", b"")  # uvicorn sets it once a request has begun
        path = target.split(b"?", 1)[0].decode("latin-1")
        body = error_body(error, protocol_for_path(path))
        status = http.HTTPStatus(error.status)
        lines = [
            f"HTTP/1.1 {status.value} {status.phrase}",
            f"content-type: {JSON}",
            f"content-length: {len(body)}",
            "connection: close",
            *(f"{name}: {value}" for name, value in error.headers.items()),
        ]
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        self.transport.close()

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"


def guarded_protocol(limits: HttpLimits) -> type[GuardedHttpProtocol]:
    """A protocol class for one server: its limits and its own count of connections."""
    chosen = limits

    class ServerProtocol(GuardedHttpProtocol):
        limits = chosen
        admitted = set()

    return ServerProtocol


class HttpServer:
    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str,
        port: int,
        limits: HttpLimits | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        limits = limits or HttpLimits()
        self._protocol = guarded_protocol(limits)
        config = uvicorn.Config(
            app,
            http=self._protocol,
            ws="none",  # no route speaks WebSocket: an upgrade is an ordinary request
            lifespan="off",
            access_log=False,  # requests are counted in /metrics instead
            # no logging.config.dictConfig: it closes every handler of the process, and in a
            # Serve replica that left Serve's log buffer without a target, keeping every
            # record from then on (the gateway grew ~3.5 KiB per request)
            log_config=None,
            log_level="warning",
            timeout_keep_alive=limits.idle_timeout_s,
            ssl_context_factory=None if ssl_context is None else lambda _c, _d: ssl_context,
        )
        self._host, self._port = host, port
        self._server = uvicorn.Server(config)
        self._task: asyncio.Task | None = None

    @property
    def port(self) -> int:
        """The port it listens on: the one asked for, or the one given for port 0."""
        return self._port

    @property
    def connections(self) -> int:
        """Open connections under the cap now."""
        return len(self._protocol.admitted)

    async def start(self, timeout_s: float = 30.0) -> None:
        sock = bind_socket(self._host, self._port)  # fail here, loudly, if the port is taken
        self._port = sock.getsockname()[1]
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        deadline = time.monotonic() + timeout_s
        while not self._server.started and not self._task.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if not self._server.started:
            failure = self._task.exception() if self._task.done() else "timed out"
            raise RuntimeError(f"HTTP server did not start on {self._host}:{self._port}: {failure}")

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, timeout=10)
