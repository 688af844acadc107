"""The whole HTTP API of a real ``loom serve`` fuzzed from its own ``/openapi.json``
(schemathesis), with API keys off (the embedded default) and on (``minilm``, ``digits`` and
the tiny GPT-2, with the job scheduler): every operation gets cases that fit its schema and
cases that break it; no answer may be a 5xx, every 4xx is in its route's protocol shape, and
every answer conforms to the document. Beside it, the generation parameters that once took a
replica down or answered 500, sent to a real generation replica.

Jobs the fuzz submits are real: each is cancelled as soon as the submit operation is done (a
job's event stream also lasts until the job is final), so none keeps the scheduler busy for
the tests after this one. The loop and its checks are ``tests/api_fuzz.py``; the unit tier
runs it with more cases against in-process models
(``tests/unit/serving/gateway/test_openapi_fuzz.py``)."""

from __future__ import annotations

import json
from typing import Any

import httpx
from api_fuzz import CHECKS, fuzz
from loom_process import API_KEY, LoomProcess
from schemathesis.specs.openapi.checks import ignored_auth

MAX_EXAMPLES = 6
"""Cases per operation and mode: 22 operations x 2 modes x 2 servers x 6. At 12 the keyless
server alone took 163 s here (real models on 2 cores, a loaded machine; a completion may
generate up to the model's context); the unit tier runs 60 per operation and mode against
in-process models."""
TIMEOUT_S = 120
"""A completion on a real replica may run to the model's context."""


def test_the_embedded_default_fuzzed_from_its_document_answers_no_5xx(
    loom_server: LoomProcess,
) -> None:
    assert fuzz(loom_server.url, {}, CHECKS, max_examples=MAX_EXAMPLES, timeout_s=TIMEOUT_S) == []


def test_a_keyed_server_fuzzed_from_its_document_answers_no_5xx(
    keyed_server: LoomProcess,
) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    checks = [*CHECKS, ignored_auth]
    failures = fuzz(
        keyed_server.url, headers, checks, max_examples=MAX_EXAMPLES, timeout_s=TIMEOUT_S
    )
    assert failures == []


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
