"""Every endpoint of the embedded default, and every bad input, over real HTTP."""

from __future__ import annotations

import base64
import math
import os

import httpx
import numpy as np
import pytest
from openai import OpenAI
from sidecar_totals import wait_for_total

from serving.monitoring.scrape import scrape_sidecars, total

SENTENCES = ["Loom serves models.", "The cat sat on the mat.", "A third, slightly longer sentence."]


def openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def v2_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    assert isinstance(body["error"], str)
    return body["error"]


def test_openai_sdk_embeds_a_list_of_strings(loom_server) -> None:
    client = OpenAI(base_url=f"{loom_server.url}/v1", api_key="unused")
    result = client.embeddings.create(model="minilm", input=SENTENCES)
    assert [d.index for d in result.data] == [0, 1, 2]
    for item in result.data:
        assert len(item.embedding) == 384
        assert math.sqrt(sum(x * x for x in item.embedding)) == pytest.approx(1.0, abs=1e-4)
    assert result.usage.prompt_tokens > len(SENTENCES)  # at least [CLS] word [SEP] each
    assert result.model == "minilm"


def test_float_and_base64_encodings_carry_the_same_vector(loom_server) -> None:
    as_float = httpx.post(
        f"{loom_server.url}/v1/embeddings", json={"model": "minilm", "input": "same text"}
    ).json()
    as_b64 = httpx.post(
        f"{loom_server.url}/v1/embeddings",
        json={"model": "minilm", "input": "same text", "encoding_format": "base64"},
    ).json()
    decoded = np.frombuffer(base64.b64decode(as_b64["data"][0]["embedding"]), dtype="<f4")
    assert decoded.tolist() == pytest.approx(as_float["data"][0]["embedding"], abs=1e-6)
    assert (
        as_float["usage"]["prompt_tokens"] == as_b64["usage"]["prompt_tokens"] == 4
    )  # CLS same text SEP


def test_models_are_listed_in_openai_and_v2_shapes(loom_server) -> None:
    listed = httpx.get(f"{loom_server.url}/v1/models").json()
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == ["minilm"]
    one = httpx.get(f"{loom_server.url}/v1/models/minilm").json()
    assert one["id"] == "minilm"
    meta = httpx.get(f"{loom_server.url}/v2/models/minilm").json()
    assert meta["name"] == "minilm"
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]


def test_v2_server_health_and_readiness(loom_server) -> None:
    server = httpx.get(f"{loom_server.url}/v2").json()
    assert server["name"] == "loom"
    assert "version" in server
    assert httpx.get(f"{loom_server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{loom_server.url}/v2/health/ready").json() == {"ready": True}
    model = httpx.get(f"{loom_server.url}/v2/models/minilm/ready")
    assert model.status_code == 200
    assert model.json() == {"name": "minilm", "ready": True}


def test_v2_infer_matches_the_openai_route(loom_server) -> None:
    body = {
        "id": "req-7",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": SENTENCES[:2]}],
    }
    answer = httpx.post(f"{loom_server.url}/v2/models/minilm/infer", json=body).json()
    assert answer["id"] == "req-7"
    assert answer["model_name"] == "minilm"
    assert answer["model_version"] == "1"
    (output,) = answer["outputs"]
    assert output["name"] == "embedding"
    assert output["datatype"] == "FP32"
    assert output["shape"] == [2, 384]
    rows = np.array(output["data"], dtype=np.float32).reshape(2, 384)
    openai = httpx.post(
        f"{loom_server.url}/v1/embeddings", json={"model": "minilm", "input": SENTENCES[:2]}
    ).json()
    for row, item in zip(rows, openai["data"], strict=True):
        assert row.tolist() == pytest.approx(item["embedding"], abs=1e-5)


def test_metrics_show_requests_latency_batches_queue_and_load_time(loom_server) -> None:
    """The gateway's own series at /metrics; the replica's at its node's sidecar, found
    through /v1/admin/targets as Prometheus finds it."""
    httpx.post(f"{loom_server.url}/v1/embeddings", json={"model": "minilm", "input": "count me"})
    text = httpx.get(f"{loom_server.url}/metrics").text
    assert 'loom_requests_total{model="minilm",route="embeddings",status="200"}' in text
    assert "loom_request_duration_seconds_bucket" in text
    assert "loom_batch_size" not in text  # the replica's: not the gateway's to export
    # the replica writes its stats every second
    batches = wait_for_total(loom_server.url, "loom_batch_size_count", bool, model="minilm")
    assert batches >= 1
    replica = scrape_sidecars(loom_server.url)
    assert total(replica, "loom_inputs_total", model="minilm", version="1") >= 1
    assert total(replica, "loom_model_load_seconds", model="minilm", version="1") > 0
    assert "\nloom_queue_depth{" in replica
    assert total(replica, "loom_replica_memory_bytes", kind="rows") > 0
    assert total(replica, "loom_sidecar_replicas") >= 1


def test_status_route_reports_deployments_and_replicas(loom_server) -> None:
    status = httpx.get(f"{loom_server.url}/v1/status").json()
    assert status["application"] == "RUNNING"
    # the embedded default: one single-threaded replica per core, at most 8
    expected = min(os.cpu_count() or 1, 8)
    assert status["deployments"]["model-minilm"]["running_replicas"] == expected
    assert status["deployments"]["gateway"]["running_replicas"] == 1


# ---- bad input: a clear error in the protocol's shape, never a 500 ---------------------


def test_malformed_json_is_400(loom_server) -> None:
    response = httpx.post(
        f"{loom_server.url}/v1/embeddings",
        content=b'{"model": "minilm", "input": ',
        headers={"content-type": "application/json"},
    )
    assert "malformed JSON" in openai_error(response, 400)["message"]


def test_invalid_utf8_is_400(loom_server) -> None:
    response = httpx.post(
        f"{loom_server.url}/v1/embeddings",
        content=b'{"model": "minilm", "input": "\xff\xfe"}',
        headers={"content-type": "application/json"},
    )
    assert "UTF-8" in openai_error(response, 400)["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "no model"}, "model"),
        ({"model": "minilm"}, "input"),
        ({"model": "minilm", "input": 42}, "input"),
        ({"model": "minilm", "input": [1, 2, 3]}, "input"),
        ({"model": "minilm", "input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"model": "minilm", "input": "x", "dimensions": 512}, "dimensions"),
    ],
)
def test_schema_violations_are_400_naming_the_field(loom_server, body, param) -> None:
    response = httpx.post(f"{loom_server.url}/v1/embeddings", json=body)
    assert openai_error(response, 400)["param"] == param


def test_body_that_is_not_an_object_is_400(loom_server) -> None:
    response = httpx.post(f"{loom_server.url}/v1/embeddings", json=["minilm"])
    openai_error(response, 400)


def test_unknown_model_is_404_in_both_protocols(loom_server) -> None:
    response = httpx.post(f"{loom_server.url}/v1/embeddings", json={"model": "nope", "input": "x"})
    assert openai_error(response, 404)["code"] == "model_not_found"
    assert "nope" in v2_error(httpx.get(f"{loom_server.url}/v2/models/nope"), 404)
    v2_error(httpx.get(f"{loom_server.url}/v2/models/nope/ready"), 404)
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}
    v2_error(httpx.post(f"{loom_server.url}/v2/models/nope/infer", json=body), 404)


def test_empty_input_list_and_empty_string_are_400(loom_server) -> None:
    empty = httpx.post(f"{loom_server.url}/v1/embeddings", json={"model": "minilm", "input": []})
    assert "empty" in openai_error(empty, 400)["message"]
    blank = httpx.post(f"{loom_server.url}/v1/embeddings", json={"model": "minilm", "input": ""})
    openai_error(blank, 400)


def test_too_many_inputs_and_too_long_an_input_are_413(loom_server) -> None:
    many = httpx.post(
        f"{loom_server.url}/v1/embeddings", json={"model": "minilm", "input": ["x"] * 257}
    )
    assert openai_error(many, 413)["code"] == "too_many_inputs"  # default limit 256
    long = httpx.post(
        f"{loom_server.url}/v1/embeddings", json={"model": "minilm", "input": "x" * 20_001}
    )
    assert openai_error(long, 413)["code"] == "input_too_long"  # default limit 20,000 chars


def test_body_over_the_size_limit_is_413_before_it_is_read(loom_server) -> None:
    big = b'{"model": "minilm", "input": "' + b"a" * (1 << 20) + b'"}'
    response = httpx.post(
        f"{loom_server.url}/v1/embeddings",
        content=big,
        headers={"content-type": "application/json"},
    )
    assert openai_error(response, 413)["code"] == "body_too_large"


@pytest.mark.parametrize(
    ("tensor", "words"),
    [
        ({"name": "text", "datatype": "FP32", "shape": [1], "data": ["x"]}, "datatype"),
        ({"name": "text", "datatype": "BYTES", "shape": [3], "data": ["x"]}, "shape"),
        ({"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": ["x"]}, "shape"),
        ({"name": "image", "datatype": "BYTES", "shape": [1], "data": ["x"]}, "text"),
        ({"name": "text", "datatype": "BYTES", "shape": [1], "data": [7]}, "strings"),
    ],
)
def test_v2_wrong_tensor_is_400_in_v2_shape(loom_server, tensor, words) -> None:
    response = httpx.post(f"{loom_server.url}/v2/models/minilm/infer", json={"inputs": [tensor]})
    assert words in v2_error(response, 400)


def test_v2_malformed_json_is_400_in_v2_shape(loom_server) -> None:
    response = httpx.post(
        f"{loom_server.url}/v2/models/minilm/infer",
        content=b"{nope",
        headers={"content-type": "application/json"},
    )
    assert "malformed JSON" in v2_error(response, 400)


def test_unknown_route_and_wrong_method_answer_in_shape(loom_server) -> None:
    openai_error(httpx.get(f"{loom_server.url}/v1/nothing-here"), 404)
    openai_error(httpx.get(f"{loom_server.url}/v1/embeddings"), 405)
    v2_error(httpx.get(f"{loom_server.url}/v2/models/minilm/infer"), 405)
