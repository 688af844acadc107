"""The whole HTTP API of a real ``loom serve`` fuzzed from its own ``/openapi.json``
(schemathesis), with API keys off (the embedded default) and on (``minilm``, ``digits`` and
the tiny GPT-2, with the job scheduler): every operation gets cases that fit its schema and
cases that break it; no answer may be a 5xx, every 4xx is in its route's protocol shape, and
every answer conforms to the document. Beside it, the generation parameters that once took a
replica down or answered 500, sent to a real generation replica.

Jobs the fuzz submits are real: each is cancelled as soon as the submit operation is done (a
job's event stream also lasts until the job is final), so none keeps the scheduler busy for
the tests after this one. The unit tier fuzzes the same document with more cases against
in-process models (``tests/unit/serving/gateway/test_openapi_fuzz.py``)."""

from __future__ import annotations

import json
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from loom_process import API_KEY, LoomProcess
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.openapi import from_url
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

MAX_EXAMPLES = 6
"""Cases per operation and mode: 22 operations x 2 modes x 2 servers x 6. At 12 the keyless
server alone took 163 s here (real models on 2 cores, a loaded machine; a completion may
generate up to the model's context); the unit tier runs 60 per operation and mode against
in-process models."""
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


def assert_error_in_shape(path: str, response: Any) -> None:
    """A 4xx/5xx answer is its protocol's error (``response`` is schemathesis': each header a
    list): ``{"error": "..."}`` under ``/v2``, else ``{"error": {"message", ...}}``."""
    if response.status_code < 400:
        return
    headers = {name.lower(): values for name, values in response.headers.items()}
    assert headers["content-type"][0].startswith("application/json"), response.text
    error = response.json()["error"]
    if path.startswith("/v2"):
        assert isinstance(error, str), error
    else:
        assert {"message", "type", "param", "code"} <= set(error), error


def job_ids(client: httpx.Client) -> set[str]:
    return {job["id"] for job in client.get("/v1/jobs").json()["data"]}


def cancel_jobs_since(client: httpx.Client, before: set[str]) -> None:
    for job in client.get("/v1/jobs").json()["data"]:
        if job["id"] not in before and job["state"] in ("queued", "running"):
            answer = client.post(f"/v1/jobs/{job['id']}/cancel")
            assert answer.status_code in (200, 409), answer.text  # 409: it just finished


def auth_left_out(case: Any) -> bool:
    """A case that breaks its headers by leaving out the required ``Authorization`` is sent
    with no key (the key would make it valid again)."""
    given = {name.lower() for name in case.headers or {}}
    return case.meta.is_negative_at(ParameterLocation.HEADER) and "authorization" not in given


def fuzz(url: str, headers: dict[str, str], checks: list[Any]) -> list[str]:
    schema = from_url(f"{url}/openapi.json", headers=headers)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    failures = []
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        before = job_ids(client)
        try:
            for operation in operations:
                if operation.path.endswith("/events"):
                    cancel_jobs_since(client, before)
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                    @FUZZ_SETTINGS
                    @given(case=operation.as_strategy(generation_mode=mode))
                    def one_case(case: Any) -> None:
                        sent = {} if auth_left_out(case) else headers
                        response = case.call(headers=sent, timeout=120)
                        assert_error_in_shape(case.path, response)
                        case.validate_response(response, checks=checks, headers=sent)

                    try:
                        one_case()
                    except Unsatisfiable:  # nothing of it can be broken
                        assert mode is GenerationMode.NEGATIVE, operation.label
                    except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001
                        failures.append(f"{operation.label} ({mode.value}): {exc}")
                if operation.label == "POST /v1/jobs":
                    cancel_jobs_since(client, before)
        finally:
            cancel_jobs_since(client, before)
    return failures


def test_the_embedded_default_fuzzed_from_its_document_answers_no_5xx(
    loom_server: LoomProcess,
) -> None:
    assert fuzz(loom_server.url, {}, CHECKS) == []


def test_a_keyed_server_fuzzed_from_its_document_answers_no_5xx(
    keyed_server: LoomProcess,
) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert fuzz(keyed_server.url, headers, [*CHECKS, ignored_auth]) == []


def test_extreme_generation_parameters_reach_a_real_replica_without_a_5xx(
    keyed_server: LoomProcess,
) -> None:
    """Out of range: 400 naming the field. In range but extreme: answered, and the replica
    still serves the next request."""
    headers = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    with httpx.Client(base_url=keyed_server.url, headers=headers, timeout=120) as client:

        def complete(**fields: Any) -> httpx.Response:
            body = {"model": "tinygpt", "prompt": "hello", "max_tokens": 4, **fields}
            return client.post("/v1/completions", content=json.dumps(body).encode())

        for field, value in (
            ("n", 10**9),
            ("max_tokens", 2**70),
            ("seed", 2**64),
            ("seed", -(2**70)),
            ("temperature", 3),
        ):
            answer = complete(**{field: value})
            assert answer.status_code == 400, (field, value, answer.text)
            assert answer.json()["error"]["param"] == field
        for fields in (
            {"temperature": 1e-300},
            {"top_p": 1e-300},
            {"seed": 2**63 - 1},
            {"temperature": 2, "top_p": 1, "seed": 0},
            {"max_tokens": 1_000_000},
        ):
            answer = complete(**fields)
            assert answer.status_code < 500, (fields, answer.text)
            if answer.status_code >= 400:
                assert answer.json()["error"]["message"]
        for stream in (False, True):
            after = complete(stream=stream)
            assert after.status_code == 200, after.text
