"""Rate limits per client and route family: token-bucket arithmetic on a hand clock, who a
client is, and the 429 with Retry-After in each route's protocol shape."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from live_gateway import live_gateway
from starlette.responses import JSONResponse

from serving.config.rate_limits import RateLimit, RateLimitsConfig
from serving.config.server import ServerConfig
from serving.gateway.rate_limit import (
    RateLimiter,
    RateLimitMiddleware,
    TokenBucket,
    client_key,
    retry_after_header,
    route_family,
)
from training.callers import Caller


class HandClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_a_bucket_lets_a_burst_through_then_the_rate() -> None:
    # rate 2/s, burst 3: three at t=0 pass; the 4th is due 0.5 s later
    bucket = TokenBucket(rate_per_s=2.0, burst=3.0, tokens=3.0, updated_s=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.25) == pytest.approx(0.25)  # half a token back: 0.25 s to go
    assert bucket.take(0.5) == 0.0  # one whole token: taken
    # idle for 10 s refills to the burst (3), never past it
    assert [bucket.take(10.5) for _ in range(4)][-1] == pytest.approx(0.5)


def test_each_client_and_family_has_its_own_bucket() -> None:
    clock = HandClock()
    config = RateLimitsConfig(infer=RateLimit(rate_per_s=1, burst=2), jobs=None)
    limiter = RateLimiter(config, clock=clock)
    assert [limiter.wait_s("infer", "addr:a") for _ in range(3)] == [0.0, 0.0, 1.0]
    assert limiter.wait_s("infer", "addr:b") == 0.0  # another client: its own burst
    assert limiter.wait_s("jobs", "addr:a") == 0.0  # jobs: no limit configured
    clock.now_s += 1.0  # one token back for a
    assert limiter.wait_s("infer", "addr:a") == 0.0


def test_the_least_recently_used_client_is_dropped_past_max_clients() -> None:
    clock = HandClock()
    config = RateLimitsConfig(infer=RateLimit(rate_per_s=1, burst=1), max_clients=2)
    limiter = RateLimiter(config, clock=clock)
    assert limiter.wait_s("infer", "a") == 0.0
    assert limiter.wait_s("infer", "b") == 0.0
    assert limiter.wait_s("infer", "c") == 0.0  # a, used least recently, is dropped
    assert limiter.wait_s("infer", "b") == 1.0  # b was kept: still empty
    assert limiter.wait_s("infer", "a") == 0.0  # a starts full again


ALICE = Caller("alice", frozenset({"infer"}))
BOB = Caller("bob", frozenset({"infer", "jobs"}))
KEYS = {
    "alice-key-one-0123456789": ALICE,
    "alice-key-two-0123456789": ALICE,  # a principal may hold several keys (rotation)
    "bob-key-0123456789abcdef": BOB,
}


def test_a_client_is_the_principal_of_its_key_never_the_key_else_its_address() -> None:
    key = client_key("Bearer alice-key-one-0123456789", "10.0.0.1", KEYS.get)
    assert key == "principal:alice"
    assert key == client_key("bearer alice-key-two-0123456789", "10.0.0.2", KEYS.get)
    assert client_key("Bearer bob-key-0123456789abcdef", "10.0.0.1", KEYS.get) == "principal:bob"
    # no key, an empty one, one nobody holds (a 401 to come), or no keys at all: the address
    assert client_key(None, "10.0.0.1", KEYS.get) == "addr:10.0.0.1"
    assert client_key("Bearer ", "10.0.0.1", KEYS.get) == "addr:10.0.0.1"
    assert client_key("Bearer not-a-key-0123456789", "10.0.0.1", KEYS.get) == "addr:10.0.0.1"
    assert client_key("Bearer alice-key-one-0123456789", "10.0.0.1") == "addr:10.0.0.1"


@pytest.mark.parametrize(
    ("path", "family"),
    [
        ("/v1/embeddings", "infer"),
        ("/v1/completions", "infer"),
        ("/v1/chat/completions/", "infer"),
        ("/v2/models/digits/infer", "infer"),
        ("/v2/models/digits/versions/3/infer", "infer"),
        ("/v1/jobs", "jobs"),
        ("/v1/jobs/job-1/cancel", "jobs"),
        ("/v1/models", None),
        ("/health", None),
        ("/metrics", None),
        ("/v1/jobsx", None),
    ],
)
def test_route_families(path: str, family: str | None) -> None:
    assert route_family(path) == family


def test_retry_after_is_whole_seconds_rounded_up() -> None:
    assert [retry_after_header(s) for s in (0.01, 1.0, 1.5)] == ["1", "1", "2"]


def test_rate_limits_are_off_by_default() -> None:
    assert not RateLimiter(ServerConfig().rate_limits).enabled


@pytest.fixture
def http() -> TestClient:
    config = RateLimitsConfig(
        infer=RateLimit(rate_per_s=0.5, burst=1), jobs=RateLimit(rate_per_s=1, burst=2)
    )
    app = FastAPI()

    @app.post("/v1/embeddings")
    @app.post("/v2/models/m/infer")
    @app.get("/v1/jobs")
    @app.get("/v1/models")
    async def ok() -> JSONResponse:
        return JSONResponse({"ok": True})

    limiter = RateLimiter(config, clock=HandClock())
    app.add_middleware(RateLimitMiddleware, limiter=limiter, identify=KEYS.get)
    return TestClient(app)


def test_past_the_burst_a_route_answers_429_with_retry_after_in_its_shape(
    http: TestClient,
) -> None:
    assert http.post("/v1/embeddings").status_code == 200
    refused = http.post("/v1/embeddings")
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "2"  # 1 token at 0.5/s: 2 s
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    # the same client on v2: its own route, the same family's bucket, v2's shape
    v2 = http.post("/v2/models/m/infer")
    assert v2.status_code == 429
    assert set(v2.json()) == {"error"}
    assert isinstance(v2.json()["error"], str)
    # another family, and an unlimited route, are not touched
    assert [http.get("/v1/jobs").status_code for _ in range(3)] == [200, 200, 429]
    assert all(http.get("/v1/models").status_code == 200 for _ in range(5))


def test_another_principal_has_its_own_bucket_and_a_second_key_shares_its_owners(
    http: TestClient,
) -> None:
    first = {"Authorization": "Bearer alice-key-one-0123456789"}
    second = {"Authorization": "Bearer alice-key-two-0123456789"}
    other = {"Authorization": "Bearer bob-key-0123456789abcdef"}
    assert http.post("/v1/embeddings", headers=first).status_code == 200
    assert http.post("/v1/embeddings", headers=first).status_code == 429
    assert http.post("/v1/embeddings", headers=second).status_code == 429  # alice's bucket
    assert http.post("/v1/embeddings", headers=other).status_code == 200


def test_the_gateway_counts_a_known_key_by_its_principal_and_a_wrong_one_by_its_address(
    tmp_path: Path,
) -> None:
    keys = [
        {"name": "alice", "key": "alice-key-0123456789", "scopes": ["infer"]},
        {"name": "bob", "key": "bob-key-0123456789ab", "scopes": ["infer"]},
    ]
    # one request per client per ~forever: the second of each is refused
    limits = {"infer": {"rate_per_s": 0.001, "burst": 1}}
    body = {"model": "enc", "input": "hi"}
    with (
        live_gateway(tmp_path, keys=keys, rate_limits=limits) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):

        def embed(key: str) -> int:
            headers = {"Authorization": f"Bearer {key}"}
            return http.post("/v1/embeddings", json=body, headers=headers).status_code

        assert [embed("alice-key-0123456789") for _ in range(2)] == [200, 429]
        assert embed("bob-key-0123456789ab") == 200  # bob's own bucket
        # keys nobody holds share the address's bucket: spraying them gets one 401, then 429
        assert [embed("guess-one-0123456789"), embed("guess-two-0123456789")] == [401, 429]
