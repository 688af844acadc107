"""The local default and browsers (``serving.gateway.browser_guard``): JSON routes refuse any
other Content-Type (415), a keyless gateway answers only a loopback Host (421), a
state-changing route refuses another site's Origin (403), and CORS is off unless configured.
No Ray, no sockets: the real app over in-process models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from inprocess import LOOPBACK_URL
from live_gateway import gateway_core
from pydantic import ValidationError

from serving.config.server import ServerConfig
from serving.gateway.app import build_http_app
from serving.gateway.browser_guard import normalise_origin, split_host
from serving.gateway.routes.openapi import app_routes

KEY = "browser-guard-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON_TYPE = {"Content-Type": "application/json"}
EMBED = b'{"model": "enc", "input": ["hi"]}'
# a value for each path parameter of the app's routes
PATH_VALUES = {"{name}": "enc", "{job_id}": "job-x"}


def client(tmp_path: Path, **server: Any) -> TestClient:
    return TestClient(build_http_app(gateway_core(tmp_path, **server)), base_url=LOOPBACK_URL)


def post_routes(http: TestClient) -> list[str]:
    paths = [path for method, path, _ in app_routes(http.app.routes) if method == "POST"]  # type: ignore[attr-defined]
    for template, value in PATH_VALUES.items():
        paths = [path.replace(template, value) for path in paths]
    return sorted(set(paths))


def error_of(answer: Any, path: str) -> tuple[str, str | None]:
    """(message, code) from either protocol's error shape."""
    body = answer.json()
    if path.startswith("/v2"):
        return body["error"], None
    return body["error"]["message"], body["error"]["code"]


# --- Content-Type ---------------------------------------------------------------------------

BODYLESS_POSTS = {"/v1/jobs/job-x/cancel"}
"""POST routes that read no body: the Content-Type rule has nothing to check there (a browser's
bodyless POST is refused by the Origin rule instead)."""


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",  # a browser's "simple request": no preflight
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/vnd.api+json",  # +json is refused too: one media type
        "application/jsonx",
        None,
    ],
)
def test_every_json_route_refuses_another_content_type_with_415_in_its_shape(
    tmp_path: Path, content_type: str | None
) -> None:
    http = client(tmp_path)
    routes = post_routes(http)
    assert {"/v1/jobs", "/v1/embeddings", "/v2/models/enc/infer"} <= set(routes)
    headers = {"Content-Type": content_type} if content_type else {}
    untyped_ok = {p for p in routes if is_v2_infer(p)} if content_type is None else set()
    for path in set(routes) - BODYLESS_POSTS - untyped_ok:
        answer = http.post(path, content=EMBED, headers=headers)
        assert answer.status_code == 415, (path, answer.text)
        message, code = error_of(answer, path)
        assert "application/json" in message
        assert code in (None, "unsupported_media_type")
    # nothing was submitted: a web page's text/plain job never reaches the store
    assert http.get("/v1/jobs").json()["data"] == []


def is_v2_infer(path: str) -> bool:
    return path.startswith("/v2/models/") and path.endswith("/infer")


def test_v2_infer_takes_what_tritonclient_sends_and_no_other_route_does(tmp_path: Path) -> None:
    """tritonclient.http sends no Content-Type, and octet-stream with the binary extension's
    header; a browser cannot send that header without a preflight (refused)."""
    http = client(tmp_path)
    v2 = b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}'
    binary_head = (
        b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",'
        b' "parameters": {"binary_data_size": 6}}]}'
    )
    binary = binary_head + (2).to_bytes(4, "little") + b"hi"
    octet = {"Content-Type": "application/octet-stream"}

    untyped = http.post("/v2/models/enc/infer", content=v2)
    with_header = http.post(
        "/v2/models/enc/infer",
        content=binary,
        headers={**octet, "Inference-Header-Content-Length": str(len(binary_head))},
    )
    without_header = http.post("/v2/models/enc/infer", content=v2, headers=octet)
    untyped_elsewhere = http.post("/v1/embeddings", content=EMBED)

    assert (untyped.status_code, with_header.status_code) == (200, 200)
    assert (without_header.status_code, untyped_elsewhere.status_code) == (415, 415)


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"]
)
def test_json_with_or_without_parameters_is_accepted_on_every_route(
    tmp_path: Path, content_type: str
) -> None:
    http = client(tmp_path)
    for path in post_routes(http):
        answer = http.post(path, content=EMBED, headers={"Content-Type": content_type})
        assert answer.status_code != 415, (path, answer.text)
    embedded = http.post("/v1/embeddings", content=EMBED, headers={"Content-Type": content_type})
    assert embedded.status_code == 200


# --- Host -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("localhost", 200),
        ("localhost:8000", 200),
        ("LOCALHOST.", 200),  # case and the root's dot: the same name
        ("127.0.0.1:8000", 200),
        ("127.9.8.7", 200),  # all of 127.0.0.0/8 is loopback
        ("[::1]:8000", 200),
        ("evil.example", 421),  # a rebound name: the page's own
        ("evil.example:8000", 421),
        ("127.0.0.1.nip.io", 421),  # resolves to loopback, but names another site
        ("localhost.evil.example", 421),
        ("10.0.0.1:8000", 421),
        ("0.0.0.0", 421),
        ("::1", 421),  # IPv6 without brackets is not a Host
        ("localhost:http", 421),
        ("", 421),
    ],
)
def test_without_keys_only_a_loopback_host_is_answered(
    tmp_path: Path, host: str, status: int
) -> None:
    http = client(tmp_path)
    for path in ("/v1/models", "/v2/models/enc"):
        answer = http.get(path, headers={"Host": host})
        assert answer.status_code == status, (host, path, answer.text)
        if status == 421:
            message, code = error_of(answer, path)
            assert "loopback" in message
            assert code in (None, "misdirected_request")
    posted = http.post("/v1/embeddings", content=EMBED, headers={"Host": host, **JSON_TYPE})
    assert posted.status_code == status


def test_health_and_metrics_answer_any_host_and_keys_on_any_host_too(tmp_path: Path) -> None:
    keyless = client(tmp_path / "a")
    for path in ("/v2/health/live", "/v2/health/ready", "/metrics"):
        assert keyless.get(path, headers={"Host": "pod-10-0-0-7:8000"}).status_code == 200
    keyed = client(tmp_path / "b", api_keys=[KEY])
    # a public bind with keys is the operator's choice: the Host is theirs to pick
    answer = keyed.get("/v1/models", headers={"Host": "loom.example.com", **AUTH})
    assert answer.status_code == 200


# --- Origin ---------------------------------------------------------------------------------

HOST = {"Host": "127.0.0.1:8000"}


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        (None, 200),  # not a browser
        ("http://127.0.0.1:8000", 200),  # the server's own origin
        ("http://localhost:8000", 200),
        ("https://[::1]:8000", 200),
        ("http://evil.example", 403),
        ("https://evil.example:8000", 403),
        ("http://127.0.0.1:3000", 403),  # another local server's page
        ("http://localhost", 403),  # port 80, not the one the request went to
        ("null", 403),  # a sandboxed frame or a file:// page
        ("http://127.0.0.1:8000/x", 403),  # not an origin
    ],
)
def test_a_state_changing_route_refuses_another_sites_origin_with_403(
    tmp_path: Path, origin: str | None, status: int
) -> None:
    http = client(tmp_path)
    headers = {**HOST, **JSON_TYPE, **({"Origin": origin} if origin else {})}
    for path, body in (
        ("/v1/embeddings", EMBED),
        (
            "/v2/models/enc/infer",
            b'{"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}',
        ),
        ("/v1/jobs/job-x/cancel", b""),  # a bodyless POST: the Origin rule is what refuses it
    ):
        answer = http.post(path, content=body, headers=headers)
        if status == 403:
            assert answer.status_code == 403, (origin, path, answer.text)
            message, code = error_of(answer, path)
            assert "Origin" in message
            assert code in (None, "origin_refused")
        else:
            assert answer.status_code != 403, (origin, path, answer.text)
    # reads are not state-changing: answered, but with no CORS header the page cannot read them
    read = http.get("/v1/models", headers={**HOST, "Origin": "http://evil.example"})
    assert read.status_code == 200
    assert "access-control-allow-origin" not in read.headers


def test_with_keys_on_another_sites_origin_is_still_refused_unless_cors_allows_it(
    tmp_path: Path,
) -> None:
    keyed = client(tmp_path / "a", api_keys=[KEY])
    headers = {"Origin": "https://app.example", **AUTH, **JSON_TYPE}
    assert keyed.post("/v1/embeddings", content=EMBED, headers=headers).status_code == 403
    allowed = client(tmp_path / "b", api_keys=[KEY], cors_allow_origins=["https://app.example"])
    answer = allowed.post("/v1/embeddings", content=EMBED, headers=headers)
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == "https://app.example"
    other = {**headers, "Origin": "https://other.example"}
    assert allowed.post("/v1/embeddings", content=EMBED, headers=other).status_code == 403


# --- CORS -----------------------------------------------------------------------------------

PREFLIGHT = {
    "Origin": "https://app.example",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type, authorization",
}


def test_cors_is_off_by_default_a_preflight_allows_nothing(tmp_path: Path) -> None:
    http = client(tmp_path)
    preflight = http.options("/v1/embeddings", headers=PREFLIGHT)
    assert preflight.status_code >= 400  # 405: no route answers OPTIONS
    assert not [name for name in preflight.headers if name.startswith("access-control-")]
    answer = http.post(
        "/v1/embeddings", content=EMBED, headers={"Origin": "http://127.0.0.1", **JSON_TYPE}
    )
    assert not [name for name in answer.headers if name.startswith("access-control-")]


def test_cors_configured_answers_exactly_its_origins(tmp_path: Path) -> None:
    http = client(tmp_path, cors_allow_origins=["https://app.example:443"])  # default port
    preflight = http.options("/v1/embeddings", headers=PREFLIGHT)
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in preflight.headers  # keys, not cookies
    other = http.options("/v1/embeddings", headers={**PREFLIGHT, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize(
    "origin", ["*", "https://app.example/", "app.example", "ftp://app.example", "https://a@b"]
)
def test_cors_allow_origins_takes_only_origins(origin: str) -> None:
    with pytest.raises(ValidationError, match="not an origin"):
        ServerConfig(cors_allow_origins=(origin,))


# --- the pure parts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authority", "split"),
    [
        ("localhost", ("localhost", None)),
        ("LocalHost:80", ("localhost", 80)),
        ("[::1]:8000", ("::1", 8000)),
        ("[::1]", ("::1", None)),
        ("[::1]x", None),
        ("::1", None),
        ("a:b", None),
        ("a:", None),
        (":80", None),
    ],
)
def test_split_host(authority: str, split: tuple[str, int | None] | None) -> None:
    assert split_host(authority) == split


@pytest.mark.parametrize(
    ("origin", "normalised"),
    [
        ("https://App.Example:443", "https://app.example"),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://[::1]:8000", "http://[::1]:8000"),
        ("null", None),
        ("file://", None),
        ("http://a.example/path", None),
        ("http://user@a.example", None),
    ],
)
def test_normalise_origin(origin: str, normalised: str | None) -> None:
    assert normalise_origin(origin) == normalised
