"""The whole HTTP API fuzzed from its own OpenAPI document (schemathesis), against a live
gateway with no Ray (``live_gateway``: the real app on the real ``HttpServer``, models
answered in-process, jobs in a SQLite store), once with API keys off and once on; the loop
and its checks are ``tests/api_fuzz.py``, which the e2e tier runs too.

Every operation of ``/openapi.json`` gets cases that fit its schema and cases that break it:
no answer may be a 5xx, every 4xx is in the route's protocol error shape, and every answer
conforms to the document (status, content type, body schema); with keys on, a route that
needs a key refuses a request without one. The tier above runs the same against ``loom
serve`` (``tests/e2e/test_api_fuzz_e2e.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from api_fuzz import CHECKS, fuzz
from live_gateway import live_gateway
from schemathesis.specs.openapi.checks import ignored_auth

ADMIN_KEY = "fuzz-admin-key-0123456789"
MAX_EXAMPLES = 60
"""Cases per operation, mode and server: 22 operations x 2 modes x 2 servers x 60, about a
minute and a half here (2 cores)."""


@pytest.fixture(scope="module")
def open_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with live_gateway(tmp_path_factory.mktemp("fuzz-open")) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("fuzz-keyed")
    with live_gateway(
        home, api_keys=["fuzz-user-key-0123456789"], admin_api_keys=[ADMIN_KEY]
    ) as url:
        yield url


def test_every_route_with_keys_off_answers_in_its_shape_and_never_5xx(open_gateway: str) -> None:
    assert fuzz(open_gateway, {}, CHECKS, max_examples=MAX_EXAMPLES, timeout_s=60) == []


def test_every_route_with_keys_on_answers_in_its_shape_and_never_5xx(keyed_gateway: str) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    checks = [*CHECKS, ignored_auth]
    assert fuzz(keyed_gateway, headers, checks, max_examples=MAX_EXAMPLES, timeout_s=60) == []
