"""Every gateway route goes through one wrapper (``serving.gateway.endpoint``): the request-id
rule, 504 once the envelope's deadline passes, and a bug answered 500 in the protocol's
shape, logged once with the request id and counted. No Ray: the routes' calls go to a
stand-in for the version app's handle."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from inprocess import LOOPBACK_URL, InProcessHandle, gateway_over
from prometheus_client import REGISTRY

from serving.config import parse_config
from serving.gateway.app import build_http_app
from serving.messages import InferCall, Overloaded

MODEL = "enc-endpoints"
EMBED = {"model": MODEL, "input": ["hello"]}
LIMITS = {"max_inputs": 2, "max_input_chars": 10}
V2_INFER = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hello"]}]}


def client(infer: Callable[[InferCall], Awaitable[Any]], **server: object) -> TestClient:
    """The gateway's app over one embed model whose version app answers with ``infer``."""
    model = {"name": MODEL, "source": MODEL, "task": "embed", "limits": LIMITS}
    config = parse_config({"server": server, "models": [model]})

    return TestClient(
        build_http_app(gateway_over(config, MODEL, InProcessHandle(infer))), base_url=LOOPBACK_URL
    )


async def hang(call: InferCall) -> Any:
    await asyncio.Event().wait()  # a replica that never answers


async def bug(call: InferCall) -> Any:
    raise RuntimeError("replica bug")


def requests_counted(route: str, status: str) -> float:
    labels = {"model": MODEL, "route": route, "status": status}
    return REGISTRY.get_sample_value("loom_requests_total", labels) or 0.0


def test_a_clients_request_id_is_echoed_and_a_missing_or_oversized_one_replaced() -> None:
    http = client(bug)
    given = http.get("/v1/models", headers={"x-request-id": "trace-42"})
    assert given.headers["x-request-id"] == "trace-42"

    made = http.get("/v1/models").headers["x-request-id"]
    too_long = http.get("/v1/models", headers={"x-request-id": "x" * 129})
    assert len(made) == 32
    assert len(too_long.headers["x-request-id"]) == 32
    assert (
        http.get("/v1/models", headers={"x-request-id": "x" * 128}).headers["x-request-id"]
        == "x" * 128
    )


def test_a_request_past_its_deadline_is_504_in_each_protocols_shape() -> None:
    http = client(hang, request_timeout_s=0.05)
    before = requests_counted("embeddings", "504")

    openai = http.post("/v1/embeddings", json=EMBED, headers={"x-request-id": "slow-1"})
    v2 = http.post(f"/v2/models/{MODEL}/infer", json=V2_INFER)

    assert openai.status_code == v2.status_code == 504
    assert openai.json()["error"]["type"] == "timeout_error"
    assert openai.headers["x-request-id"] == "slow-1"
    assert isinstance(v2.json()["error"], str)
    assert requests_counted("embeddings", "504") - before == 1


async def overloaded(call: InferCall) -> Any:
    raise Overloaded(MODEL, 1)


def test_every_5xx_is_logged_once_with_its_request_id_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not only bugs: a 504 and a replica's 503 are in the log too, without a traceback."""
    before_503 = requests_counted("embeddings", "503")
    with caplog.at_level(logging.WARNING, logger="serving"):
        late = client(hang, request_timeout_s=0.05).post(
            "/v1/embeddings", json=EMBED, headers={"x-request-id": "late-3"}
        )
        shed = client(overloaded).post(
            "/v1/embeddings", json=EMBED, headers={"x-request-id": "shed-4"}
        )

    assert (late.status_code, shed.status_code) == (504, 503)
    assert shed.headers["retry-after"] == "1"
    for request_id, status in (("late-3", "504"), ("shed-4", "503")):
        lines = [r for r in caplog.records if request_id in r.getMessage()]
        assert len(lines) == 1, request_id
        assert status in lines[0].getMessage()
        assert lines[0].exc_info is None
    assert requests_counted("embeddings", "503") - before_503 == 1


def test_a_bug_is_a_500_in_shape_logged_once_with_the_request_id_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    http = client(bug)
    before = requests_counted("embeddings", "500")

    with caplog.at_level(logging.ERROR, logger="serving"):
        answer = http.post("/v1/embeddings", json=EMBED, headers={"x-request-id": "bug-7"})

    assert answer.status_code == 500
    assert answer.json()["error"]["message"] == "internal error (RuntimeError)"
    assert "replica bug" not in answer.text  # no detail, no trace for the client
    lines = [r for r in caplog.records if "bug-7" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].exc_info is not None  # the operator gets the traceback
    assert requests_counted("embeddings", "500") - before == 1


def test_unknown_routes_and_wrong_methods_answer_json_in_shape() -> None:
    http = client(bug)
    missing = http.get("/v1/nothing-here")
    wrong = http.get("/v1/embeddings")
    v2_missing = http.get("/v2/nothing-here")

    assert (missing.status_code, wrong.status_code, v2_missing.status_code) == (404, 405, 404)
    assert missing.json()["error"]["code"] == "route_error"
    assert "GET" in wrong.json()["error"]["message"]
    assert isinstance(v2_missing.json()["error"], str)


def v2_texts(*texts: str) -> dict[str, Any]:
    tensor = {"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": list(texts)}
    return {"inputs": [tensor]}


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"\xff\xfe", 400, None),
        (b'{"model": "enc-endpoints"}', 400, "input"),
        (b'{"model": "enc-endpoints", "input": []}', 400, None),
        (b'{"model": "enc-endpoints", "input": ["a", "b", "c"]}', 413, None),
        (b'{"model": "enc-endpoints", "input": ["%s"]}' % (b"x" * 11), 413, None),
        (b'{"model": "nobody", "input": ["a"]}', 404, "model"),
    ],
    ids=["malformed", "not-utf8", "missing-field", "empty", "too-many", "too-long", "unknown"],
)
def test_bad_openai_requests_are_refused_in_openai_shape_before_any_call(
    body: bytes, status: int, param: str | None
) -> None:
    http = client(bug)  # a call would be a 500: none may happen
    answer = http.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status
    error = answer.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        (f"/v2/models/{MODEL}/infer", b"{not json", 400),
        (f"/v2/models/{MODEL}/infer", b'{"inputs": []}', 400),
        (f"/v2/models/{MODEL}/infer", orjson.dumps(v2_texts("a", "b", "c")), 413),
        (f"/v2/models/{MODEL}/infer", orjson.dumps(v2_texts("x" * 11)), 413),
        ("/v2/models/nobody/infer", orjson.dumps(v2_texts("a")), 404),
    ],
    ids=["malformed", "no-inputs", "too-many", "too-long", "unknown"],
)
def test_bad_v2_requests_are_refused_in_v2_shape_before_any_call(
    path: str, body: bytes, status: int
) -> None:
    answer = client(bug).post(path, content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status
    assert isinstance(answer.json()["error"], str)
    assert answer.json()["error"]


@pytest.mark.parametrize("path", ["/v1/embeddings", f"/v2/models/{MODEL}/infer"])
def test_a_body_over_the_size_limit_is_413_in_each_protocol(path: str) -> None:
    http = client(bug, max_body_bytes=1024)
    answer = http.post(path, content=b" " * 2048, headers={"content-type": "application/json"})
    assert answer.status_code == 413
    error = answer.json()["error"]
    assert error["code"] if path.startswith("/v1") else isinstance(error, str)
