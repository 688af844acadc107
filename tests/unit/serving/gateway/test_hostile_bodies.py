"""Hand-written hostile requests against a live gateway (``live_gateway``: the real app on the
real ``HttpServer``, over sockets, models in-process): oversize bodies with and without a
Content-Length, deep nesting, invalid UTF-8, lone surrogates, NaN and Infinity, huge declared
tensor shapes, huge ``n``/``max_tokens``/``seed``. Each is refused with the right status, in
its route's protocol shape, before any model is called; none is a 5xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from live_gateway import live_gateway

MB = 1 << 20
JSON = {"content-type": "application/json"}
BODY_ROUTES = [
    "/v1/embeddings",
    "/v1/completions",
    "/v1/chat/completions",
    "/v2/models/enc/infer",
    "/v1/jobs",
    "/v1/admin/models/enc/promote",
]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with (
        live_gateway(tmp_path_factory.mktemp("hostile")) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield client


def error_of(path: str, answer: httpx.Response) -> str:
    """The message of an error answer, checked to be in the path's protocol shape."""
    assert answer.headers["content-type"].startswith("application/json")
    error = answer.json()["error"]
    if path.startswith("/v2"):
        assert isinstance(error, str)
        return error
    assert {"message", "type", "param", "code"} <= set(error)
    return str(error["message"])


def chunked(*parts: bytes) -> Iterator[bytes]:
    """A body httpx sends chunked, with no Content-Length."""
    yield from parts


@pytest.mark.parametrize("path", BODY_ROUTES)
def test_a_body_over_the_limit_is_413_with_or_without_a_content_length(
    gateway: httpx.Client, path: str
) -> None:
    declared = gateway.post(path, content=b" " * (2 * MB), headers=JSON)
    assert declared.status_code == 413
    assert "exceeds the limit" in error_of(path, declared)
    streamed = gateway.post(path, content=chunked(*[b" " * (MB // 4)] * 8), headers=JSON)
    assert "content-length" not in streamed.request.headers
    assert streamed.status_code == 413
    assert "exceeds the limit" in error_of(path, streamed)


def test_a_chunked_body_with_no_content_length_is_served(gateway: httpx.Client) -> None:
    answer = gateway.post(
        "/v1/embeddings", content=chunked(b'{"model": "enc", ', b'"input": ["hi"]}'), headers=JSON
    )
    assert answer.status_code == 200
    assert answer.json()["data"][0]["embedding"] == [0.5] * 4


HOSTILE_JSON = {
    "deep-nesting": b"[" * 100_000 + b"]" * 100_000,
    "deep-object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "invalid-utf8": b'{"model": "enc", "input": "\xff\xfe"}',
    "cesu-surrogate-bytes": b'{"model": "enc", "input": "\xed\xa0\x80"}',
    "lone-surrogate-escape": b'{"model": "enc", "name": "a\\ud800", "input": "\\udc00"}',
    "nan-literal": b'{"model": "enc", "input": NaN}',
    "infinity-literal": b'{"model": "enc", "temperature": Infinity}',
    "number-past-float64": b'{"model": "enc", "temperature": 1e999}',
    "empty": b"",
    "not-an-object": b"[1, 2]",
}


@pytest.mark.parametrize("path", BODY_ROUTES)
@pytest.mark.parametrize("body", list(HOSTILE_JSON.values()), ids=list(HOSTILE_JSON))
def test_unreadable_json_is_400_in_shape_on_every_route(
    gateway: httpx.Client, path: str, body: bytes
) -> None:
    answer = gateway.post(path, content=body, headers=JSON)
    assert answer.status_code == 400, answer.text
    assert error_of(path, answer)


def tensor(shape: list[Any], data: list[Any], datatype: str = "FP32", name: str = "input") -> Any:
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}


HOSTILE_TENSORS = {
    # (model, body, status)
    "rows-1e12": ("digits", tensor([10**12, 64], [0.0] * 64), 413),
    "rows-2^63": ("digits", tensor([2**63, 64], [0.0] * 64), 413),
    "rows-2^64": ("digits", tensor([2**64, 64], [0.0]), 400),
    "width-1e30": ("digits", tensor([1, 10**30], [0.0]), 400),
    "negative-rows": ("digits", tensor([-1, 64], []), 400),
    "rank-3": ("digits", tensor([1, 1, 64], [0.0] * 64), 400),
    "shape-not-data": ("digits", tensor([2, 64], [0.0] * 64), 400),
    "finite-but-past-fp32": ("digits", tensor([1, 64], [1e300] + [0.0] * 63), 400),
    "bools-as-pixels": ("digits", tensor([1, 64], [True] * 64), 400),
    "strings-as-pixels": ("digits", tensor([1, 64], ["1"] * 64), 400),
    "texts-1e20": ("enc", tensor([10**20], ["a"], "BYTES", "text"), 400),
    "texts-negative": ("enc", tensor([-5], [], "BYTES", "text"), 400),
    "texts-nested-deep": ("enc", tensor([1], [[[[["a"]]]]], "BYTES", "text"), 200),
}


@pytest.mark.parametrize(
    ("model", "body", "status"), list(HOSTILE_TENSORS.values()), ids=list(HOSTILE_TENSORS)
)
def test_huge_declared_shapes_and_bad_values_are_refused_before_any_array_is_built(
    gateway: httpx.Client, model: str, body: Any, status: int
) -> None:
    path = f"/v2/models/{model}/infer"
    answer = gateway.post(path, json=body)
    assert answer.status_code == status, answer.text
    if status >= 400:
        assert error_of(path, answer)


def test_nan_and_infinity_in_a_tensor_are_400(gateway: httpx.Client) -> None:
    path = "/v2/models/digits/infer"
    for value in (b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"):
        body = b'{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ['
        body += value + b", 0" * 63 + b"]}]}"
        answer = gateway.post(path, content=body, headers=JSON)
        assert answer.status_code == 400, (value, answer.text)
        assert error_of(path, answer)


HUGE_SAMPLING = {
    "n-1e9": {"n": 10**9},
    "n-0": {"n": 0},
    "max_tokens-1e12": {"max_tokens": 10**12},
    "max_tokens-2^70": {"max_tokens": 2**70},
    "max_tokens-0": {"max_tokens": 0},
    "seed-2^63": {"seed": 2**63},
    "seed-2^70": {"seed": 2**70},
    "seed--2^70": {"seed": -(2**70)},
    "temperature-3": {"temperature": 3},
    "top_p-0": {"top_p": 0},
    "stop-5-strings": {"stop": ["a", "b", "c", "d", "e"]},
    # JSON's types are kept: a boolean or a numeric string is not coerced into a number
    "max_tokens-true": {"max_tokens": True},
    "n-string": {"n": "2"},
    "temperature-false": {"temperature": False},
    "stream-string": {"stream": "true"},
}


@pytest.mark.parametrize("fields", list(HUGE_SAMPLING.values()), ids=list(HUGE_SAMPLING))
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_huge_or_out_of_range_sampling_fields_are_400_naming_the_field(
    gateway: httpx.Client, route: str, fields: dict[str, Any]
) -> None:
    if route == "/v1/completions":
        body = {"model": "gen", "prompt": "hi", **fields}
    else:
        body = {"model": "gen", "messages": [{"role": "user", "content": "hi"}], **fields}
    answer = gateway.post(route, content=json.dumps(body).encode(), headers=JSON)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == next(iter(fields))


def test_extreme_but_valid_sampling_is_answered(gateway: httpx.Client) -> None:
    for fields in ({"n": 16}, {"temperature": 1e-300}, {"top_p": 1e-300}, {"seed": 2**63 - 1}):
        body = {"model": "gen", "prompt": "hi", "max_tokens": 4, **fields}
        answer = gateway.post("/v1/completions", json=body)
        assert answer.status_code == 200, (fields, answer.text)


def test_a_path_segment_of_every_kind_is_a_404_in_shape(gateway: httpx.Client) -> None:
    for path in ("/v1/models/%00", "/v2/models/%F0%9F%92%A9/ready", "/v1/jobs/%2e%2e", "/v2/x"):
        answer = gateway.get(path)
        assert answer.status_code == 404, (path, answer.text)
        assert error_of(path, answer)
