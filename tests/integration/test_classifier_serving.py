"""Classifiers through the real gateway on one local Ray: a digits (tensor) model and a tiny
text model answer Open Inference Protocol v2 requests with their engines' probabilities."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from serving_stack import CLASSIFY_MAX_ROWS as MAX_ROWS
from serving_stack import SENTIMENT_LABELS, SharedStack

from models.engines import TensorClassifierEngine, TextClassifierEngine, build_engine
from models.store import ModelStore


@dataclass
class Served:
    url: str
    grpc_target: str
    digits: TensorClassifierEngine
    """The same weights in-process: what the served model must answer."""
    sentiment: TextClassifierEngine


def loaded(store: ModelStore, ref: str) -> TensorClassifierEngine | TextClassifierEngine:
    engine = build_engine("classify", store.resolve(ref).path, device="cpu")
    engine.load()
    return engine


@pytest.fixture(scope="module")
def served(serving_stack: SharedStack) -> Served:
    """The shared server (``serving_stack.classifier_models``): ``digits`` (a CNN, at most
    ``MAX_ROWS`` rows a request), ``digits-tight`` (the same weights, a queue of 2) and
    ``sentiment``."""
    stack = serving_stack.running()
    return Served(
        stack.url,
        stack.grpc_target,
        loaded(stack.store, "digits@1"),
        loaded(stack.store, "sentiment@1"),
    )


def pixels(rows: np.ndarray) -> dict:
    return {
        "name": "input",
        "datatype": "FP32",
        "shape": list(rows.shape),
        "data": rows.ravel().tolist(),
    }


def random_pixels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, size=(n, 64)).astype(np.float32)


def probabilities_of(answer: dict) -> np.ndarray:
    (output,) = answer["outputs"]
    assert (output["name"], output["datatype"]) == ("probabilities", "FP32")
    return np.array(output["data"], dtype=np.float32).reshape(output["shape"])


def v2_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]  # v2's error shape: {"error": "..."}
    return body["error"]


def test_a_digits_model_answers_v2_infer_with_the_engines_probabilities(served: Served) -> None:
    rows = random_pixels(3, seed=0)
    body = {"id": "d-1", "inputs": [pixels(rows)]}
    response = httpx.post(f"{served.url}/v2/models/digits/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["id"], answer["model_name"], answer["model_version"]) == ("d-1", "digits", "1")
    probabilities = probabilities_of(answer)
    assert probabilities.shape == (3, 10)
    assert np.allclose(probabilities, served.digits.run(rows), atol=1e-6)


def test_concurrent_digits_requests_each_get_their_own_rows_back(served: Served) -> None:
    requests = [random_pixels(1 + i % 3, seed=100 + i) for i in range(24)]

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            return await asyncio.gather(
                *[
                    client.post("/v2/models/digits/infer", json={"inputs": [pixels(rows)]})
                    for rows in requests
                ]
            )

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * len(requests)
    for rows, response in zip(requests, responses, strict=True):
        # joined into shared calls and batches, then cut apart: each its own answer
        assert np.allclose(probabilities_of(response.json()), served.digits.run(rows), atol=1e-6)


def test_a_text_classifier_answers_v2_infer_with_the_engines_probabilities(served: Served) -> None:
    texts = ["what a wonderful day", "this is terrible"]
    tensor = {"name": "text", "datatype": "BYTES", "shape": [2], "data": texts}
    response = httpx.post(
        f"{served.url}/v2/models/sentiment/infer", json={"inputs": [tensor]}, timeout=30
    )
    assert response.status_code == 200, response.text
    probabilities = probabilities_of(response.json())
    assert probabilities.shape == (2, 3)
    assert np.allclose(probabilities, served.sentiment.run(texts), atol=1e-6)


def test_model_metadata_lists_each_classifiers_real_tensors_and_labels(served: Served) -> None:
    digits = httpx.get(f"{served.url}/v2/models/digits", timeout=30).json()
    assert digits["platform"] == "loom-classify"
    assert digits["versions"] == ["1"]
    assert digits["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    (output,) = digits["outputs"]
    assert (output["name"], output["shape"]) == ("probabilities", [-1, 10])
    assert output["parameters"]["labels"] == [str(d) for d in range(10)]

    sentiment = httpx.get(f"{served.url}/v2/models/sentiment", timeout=30).json()
    assert sentiment["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    (output,) = sentiment["outputs"]
    assert output["shape"] == [-1, 3]
    assert output["parameters"]["labels"] == list(SENTIMENT_LABELS)


@pytest.mark.parametrize(
    ("tensor", "status", "words"),
    [
        (
            {"name": "input", "datatype": "FP32", "shape": [2, 63], "data": [0] * 126},
            400,
            "[n, 64]",
        ),
        ({"name": "input", "datatype": "FP64", "shape": [1, 64], "data": [0] * 64}, 400, "FP32"),
        ({"name": "input", "datatype": "FP32", "shape": [2, 64], "data": [0] * 64}, 400, "128"),
        ({"name": "text", "datatype": "BYTES", "shape": [1], "data": ["7"]}, 400, "'input'"),
        (
            {"name": "input", "datatype": "FP32", "shape": [MAX_ROWS + 1, 64], "data": []},
            413,
            f"limit of {MAX_ROWS}",
        ),
    ],
    ids=["63-wide", "fp64", "short-data", "text-to-a-tensor-model", "too-many-rows"],
)
def test_a_wrong_tensor_is_refused_in_v2_shape_never_a_500(served: Served, tensor, status, words):
    response = httpx.post(
        f"{served.url}/v2/models/digits/infer", json={"inputs": [tensor]}, timeout=30
    )
    assert words in v2_error(response, status)


def test_the_embeddings_route_refuses_a_classifier_naming_the_v2_route(served: Served) -> None:
    response = httpx.post(
        f"{served.url}/v1/embeddings", json={"model": "digits", "input": "seven"}, timeout=30
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "wrong_model_task"
    assert "POST /v2/models/digits/infer" in error["message"]


def test_an_unknown_classifier_is_404(served: Served) -> None:
    body = {"inputs": [pixels(random_pixels(1, seed=0))]}
    assert "nope" in v2_error(httpx.post(f"{served.url}/v2/models/nope/infer", json=body), 404)
    v2_error(httpx.get(f"{served.url}/v2/models/nope"), 404)


def test_more_rows_than_the_queue_holds_is_503_with_retry_after(served: Served) -> None:
    rows = random_pixels(3, seed=0)  # 3 rows > max_queued 2
    response = httpx.post(
        f"{served.url}/v2/models/digits-tight/infer", json={"inputs": [pixels(rows)]}, timeout=30
    )
    assert "overloaded" in v2_error(response, 503)
    assert int(response.headers["retry-after"]) >= 1
    ok = httpx.post(
        f"{served.url}/v2/models/digits-tight/infer",
        json={"inputs": [pixels(rows[:2])]},
        timeout=30,
    )
    assert ok.status_code == 200, ok.text


def test_tritonclient_grpc_gets_the_engines_answers_from_the_gateway_replica(
    served: Served,
) -> None:
    """The gateway replica's own gRPC server (``server.grpc_port``), on Serve's event loop."""
    client = triton_grpc.InferenceServerClient(served.grpc_target)
    rows = random_pixels(2, seed=5)
    pixels_in = triton_grpc.InferInput("input", [2, 64], "FP32")
    pixels_in.set_data_from_numpy(rows)
    texts = ["a fine day", "a dull one"]
    texts_in = triton_grpc.InferInput("text", [2], "BYTES")
    texts_in.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))

    digits = client.infer("digits", [pixels_in], client_timeout=30)
    sentiment = client.infer("sentiment", [texts_in], client_timeout=30)

    assert client.is_server_live()
    assert client.is_model_ready("digits")
    assert np.allclose(digits.as_numpy("probabilities"), served.digits.run(rows), atol=1e-6)
    assert np.allclose(sentiment.as_numpy("probabilities"), served.sentiment.run(texts), atol=1e-6)
