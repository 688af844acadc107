"""The whole HTTP API fuzzed from its own OpenAPI document (schemathesis), against a live
gateway with no Ray (``live_gateway``: the real app on the real ``HttpServer``, models
answered in-process, jobs in a SQLite store), once with API keys off and once on.

Every operation of ``/openapi.json`` gets cases that fit its schema and cases that break it:
no answer may be a 5xx, every 4xx is in the route's protocol error shape, and every answer
conforms to the document (status, content type, body schema); with keys on, a route that
needs a key refuses a request without one. The tier above runs the same against ``loom
serve`` (``tests/e2e/test_api_fuzz_e2e.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from live_gateway import live_gateway
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from serving.gateway.errors import protocol_for_path

ADMIN_KEY = "fuzz-admin-key-0123456789"
MAX_EXAMPLES = 60
"""Cases per operation, mode and server: 22 operations x 2 modes x 2 servers x 60, about a
minute and a half here (2 cores)."""
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,  # the same cases every run but for hypothesis' own seed; none kept
)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


def assert_error_in_shape(path: str, response: Any) -> None:
    """A 4xx/5xx body is its protocol's error (``response`` is schemathesis': each header a
    list): v2 ``{"error": "..."}`` under ``/v2``, else OpenAI's
    ``{"error": {"message", "type", "param", "code"}}``."""
    if response.status_code < 400:
        return
    headers = {name.lower(): values for name, values in response.headers.items()}
    assert headers["content-type"][0].startswith("application/json"), response.text
    body = response.json()
    if protocol_for_path(path) == "v2":
        assert set(body) == {"error"}, body
        assert isinstance(body["error"], str), body
    else:
        error = body["error"]
        assert {"message", "type", "param", "code"} <= set(error), body
        assert error["message"], body


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


def auth_left_out(case: Any) -> bool:
    """Whether a case breaks its headers by leaving out the ``Authorization`` the document
    requires: then it is sent with no key (else the key would make it valid again)."""
    given = {name.lower() for name in case.headers or {}}
    return case.meta.is_negative_at(ParameterLocation.HEADER) and "authorization" not in given


def finish_every_job(url: str, headers: dict[str, str]) -> None:
    """Cancel every job the fuzz made: a job's event stream lasts until the job is final, and
    with no scheduler here a queued job never is."""
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        for job in client.get("/v1/jobs").json()["data"]:
            if job["state"] in ("queued", "running"):
                assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200


def fuzz(url: str, headers: dict[str, str], checks: list[Any]) -> list[str]:
    """Every operation of the document at ``url``, with cases that fit its schema and cases
    that break it; what went wrong, one line per operation that failed."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=headers)
    failures = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20  # the walk found the API, not an empty document
    for operation in operations:
        if operation.path.endswith("/events"):
            finish_every_job(url, headers)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @FUZZ_SETTINGS
            @given(case=operation.as_strategy(generation_mode=mode))
            def one_case(case: Any) -> None:
                sent = {} if auth_left_out(case) else headers
                response = case.call(headers=sent, timeout=60)
                assert_error_in_shape(case.path, response)
                case.validate_response(response, checks=checks, headers=sent)

            try:
                one_case()
            except Unsatisfiable:  # nothing of it can be broken (a GET with no parameters)
                assert mode is GenerationMode.NEGATIVE, operation.label
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - every operation runs
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    return failures


def test_every_route_with_keys_off_answers_in_its_shape_and_never_5xx(open_gateway: str) -> None:
    assert fuzz(open_gateway, {}, CHECKS) == []


def test_every_route_with_keys_on_answers_in_its_shape_and_never_5xx(keyed_gateway: str) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert fuzz(keyed_gateway, headers, [*CHECKS, ignored_auth]) == []
