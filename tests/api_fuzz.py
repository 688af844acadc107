"""The API fuzz both tiers run (``tests/unit/serving/gateway/test_openapi_fuzz.py`` against
the app with in-process models, ``tests/e2e/test_api_fuzz_e2e.py`` against ``loom serve``):
every operation of the server's own ``/openapi.json`` (schemathesis) gets cases that fit its
schema and cases that break it. No answer may be a 5xx, every 4xx is in its route's protocol
shape, every answer conforms to the document.

Jobs the fuzz submits are cancelled once the submit operation is done, before any event
stream is fuzzed (a job's stream lasts until the job is final) and at the end, so none is
left queued or running for the tests after.

    failures = fuzz(url, {"Authorization": "Bearer ..."}, [*CHECKS, ignored_auth],
                    max_examples=60, timeout_s=60)
    assert failures == []
"""

from __future__ import annotations

from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from serving.gateway.errors import protocol_for_path

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
MIN_OPERATIONS = 20
"""The walk found the API, not an empty document."""


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


def auth_left_out(case: Any) -> bool:
    """Whether a case breaks its headers by leaving out the ``Authorization`` the document
    requires: then it is sent with no key (else the key would make it valid again)."""
    given = {name.lower() for name in case.headers or {}}
    return case.meta.is_negative_at(ParameterLocation.HEADER) and "authorization" not in given


def _job_ids(client: httpx.Client) -> set[str]:
    return {job["id"] for job in client.get("/v1/jobs").json()["data"]}


def _cancel_jobs_since(client: httpx.Client, before: set[str]) -> None:
    for job in client.get("/v1/jobs").json()["data"]:
        if job["id"] not in before and job["state"] in ("queued", "running"):
            answer = client.post(f"/v1/jobs/{job['id']}/cancel")
            assert answer.status_code in (200, 409), answer.text  # 409: it just finished


def fuzz(
    url: str, headers: dict[str, str], checks: list[Any], *, max_examples: int, timeout_s: float
) -> list[str]:
    """Every operation of the document at ``url``, ``max_examples`` cases per operation and
    mode (fitting, breaking); what went wrong, one line per operation and mode that failed."""
    case_settings = settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,  # the same cases every run but for hypothesis' own seed; none kept
    )
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=headers)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= MIN_OPERATIONS
    failures = []
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        before = _job_ids(client)
        try:
            for operation in operations:
                if operation.path.endswith("/events"):
                    _cancel_jobs_since(client, before)
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                    @case_settings
                    @given(case=operation.as_strategy(generation_mode=mode))
                    def one_case(case: Any) -> None:
                        sent = {} if auth_left_out(case) else headers
                        response = case.call(headers=sent, timeout=timeout_s)
                        assert_error_in_shape(case.path, response)
                        case.validate_response(response, checks=checks, headers=sent)

                    try:
                        one_case()
                    except Unsatisfiable:  # nothing of it can be broken (a GET, no parameters)
                        assert mode is GenerationMode.NEGATIVE, operation.label
                    except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - run them all
                        failures.append(f"{operation.label} ({mode.value}): {exc}")
                if operation.label == "POST /v1/jobs":
                    _cancel_jobs_since(client, before)
        finally:
            _cancel_jobs_since(client, before)
    return failures
