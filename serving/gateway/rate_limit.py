"""Rate limits per client and route family (``server.rate_limits``): a token bucket each,
answered 429 with ``Retry-After`` in the route's protocol shape before the route runs.

A client is an opaque string (``client_key``): the principal its bearer key names (every
key of one principal shares its buckets), else its address: no key, a key nobody holds (on
its way to a 401), or the keyless local mode.

    limiter = RateLimiter(config.server.rate_limits)
    app.add_middleware(RateLimitMiddleware, limiter=limiter, identify=keys.identify)
    limiter.wait_s("infer", "principal:ci-bot")   # 0.0: go on; > 0: refused, retry in that long
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from starlette.types import ASGIApp, Receive, Scope, Send

from serving.config.rate_limits import RateLimit, RateLimitsConfig
from serving.gateway.errors import ApiError, error_response
from training.callers import Caller

RouteFamily = Literal["infer", "jobs"]
Identify = Callable[[str], Caller | None]
"""A bearer key -> the caller it names, or None (``KeyCheck.identify``)."""

INFER_PATHS = frozenset({"/v1/embeddings", "/v1/completions", "/v1/chat/completions"})


def route_family(path: str) -> RouteFamily | None:
    """The family a path's rate limit is counted in; None: not limited."""
    path = path.rstrip("/") or "/"
    if path in INFER_PATHS or (path.startswith("/v2/models/") and path.endswith("/infer")):
        return "infer"
    if path == "/v1/jobs" or path.startswith("/v1/jobs/"):
        return "jobs"
    return None


def client_key(
    authorization: str | None, address: str | None, identify: Identify | None = None
) -> str:
    """Who a bucket belongs to: ``principal:<name>`` when ``identify`` knows the bearer key
    (never the key itself), else ``addr:<address>``."""
    if authorization and identify is not None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            caller = identify(token.strip())
            if caller is not None:
                return f"principal:{caller.principal}"
    return f"addr:{address or 'unknown'}"


@dataclass
class TokenBucket:
    """``burst`` tokens, refilled at ``rate_per_s``; a request takes one.

    rate 2/s, burst 3: 3 requests at t=0 pass, the 4th waits 0.5 s for the next token."""

    rate_per_s: float
    burst: float
    tokens: float
    updated_s: float

    def take(self, now_s: float) -> float:
        """Take a token: 0.0 when one was there, else the seconds until one will be."""
        elapsed_s = max(0.0, now_s - self.updated_s)
        self.tokens = min(self.burst, self.tokens + elapsed_s * self.rate_per_s)
        self.updated_s = now_s
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


class RateLimiter:
    """The buckets of every client, per family, at most ``max_clients`` each (LRU)."""

    def __init__(
        self, config: RateLimitsConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._limits: dict[str, RateLimit | None] = {"infer": config.infer, "jobs": config.jobs}
        self._max_clients = config.max_clients
        self._buckets: dict[str, OrderedDict[str, TokenBucket]] = {}
        self._clock = clock

    @property
    def enabled(self) -> bool:
        return any(limit is not None for limit in self._limits.values())

    def wait_s(self, family: str, client: str) -> float:
        """0.0: the request may go on; else refused, and a token is due in that many s."""
        limit = self._limits.get(family)
        if limit is None:
            return 0.0
        now_s = self._clock()
        buckets = self._buckets.setdefault(family, OrderedDict())
        bucket = buckets.get(client)
        if bucket is None:
            bucket = TokenBucket(limit.rate_per_s, float(limit.burst), float(limit.burst), now_s)
            buckets[client] = bucket
            if len(buckets) > self._max_clients:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(client)
        return bucket.take(now_s)


def retry_after_header(wait_s: float) -> str:
    """Whole seconds, rounded up, at least 1: 0.2 s -> "1", 1.5 s -> "2"."""
    return str(max(1, math.ceil(wait_s)))


def rate_limited(family: str, wait_s: float) -> ApiError:
    """The 429 of a request its bucket refused (``wait_s`` until a token is due), on every
    transport: HTTP answers it with ``Retry-After``, gRPC with RESOURCE_EXHAUSTED."""
    retry = retry_after_header(wait_s)
    return ApiError(
        429,
        f"rate limit of the {family} routes exceeded; retry after {retry} s",
        code="rate_limit_exceeded",
        headers={"Retry-After": retry},
    )


class RateLimitMiddleware:
    """Counts each request of a limited family against its client's bucket; a refused one
    is answered 429 with ``Retry-After`` (OpenAI's error shape, or v2's under ``/v2``)."""

    def __init__(
        self, app: ASGIApp, *, limiter: RateLimiter, identify: Identify | None = None
    ) -> None:
        """``identify`` None (the keyless local mode): every client is its address."""
        self.app = app
        self.limiter = limiter
        self.identify = identify

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        family = route_family(path)
        if family is not None:
            headers = dict(scope.get("headers") or [])
            authorization = headers.get(b"authorization", b"").decode("latin-1") or None
            client = scope.get("client")
            who = client_key(authorization, client and client[0], self.identify)
            wait_s = self.limiter.wait_s(family, who)
            if wait_s > 0:
                await error_response(rate_limited(family, wait_s), path)(scope, receive, send)
                return
        await self.app(scope, receive, send)
