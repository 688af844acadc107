"""tritonclient, unchanged, against ``loom serve`` as its users run it: ``tritonclient.http``
with its defaults (the binary tensor data extension both ways) and ``tritonclient.grpc`` on
``server.grpc_port`` (the documented config: the keyed session server sets it, conftest), for
the bundled embeddings model (texts in, FP32 out) and the digits classifier (FP32 rows in),
the API key as each client passes headers. The same request through both clients, and through
HTTP's JSON, gives the same numbers."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from loom_process import API_KEY, LoomProcess
from tritonclient.utils import InferenceServerException

HTTP_AUTH = {"Authorization": f"Bearer {API_KEY}"}
GRPC_AUTH = {"authorization": f"Bearer {API_KEY}"}
TEXTS = np.array([b"the fox", "caf\u00e9 au lait".encode(), b"a model serves"], dtype=np.object_)


@pytest.fixture(scope="module")
def http_client(keyed_server: LoomProcess) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(keyed_server.url.removeprefix("http://"))


@pytest.fixture(scope="module")
def grpc_client(keyed_server: LoomProcess) -> triton_grpc.InferenceServerClient:
    assert keyed_server.grpc_port is not None
    return triton_grpc.InferenceServerClient(f"127.0.0.1:{keyed_server.grpc_port}")


def embed(client, module, *, binary: bool = True) -> np.ndarray:
    tensor = module.InferInput("text", [len(TEXTS)], "BYTES")
    if module is triton_http:
        tensor.set_data_from_numpy(TEXTS, binary_data=binary)
        output = module.InferRequestedOutput("embedding", binary_data=binary)
        # a copy each call: tritonclient.http adds its Inference-Header-Content-Length to the
        # headers dict it is given, which the next (JSON) call would then send stale
        result = client.infer("minilm", [tensor], outputs=[output], headers=dict(HTTP_AUTH))
    else:
        tensor.set_data_from_numpy(TEXTS)
        output = module.InferRequestedOutput("embedding")
        result = client.infer("minilm", [tensor], outputs=[output], headers=dict(GRPC_AUTH))
    return result.as_numpy("embedding")


def classify(client, module, rows: np.ndarray) -> np.ndarray:
    tensor = module.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    auth = dict(HTTP_AUTH if module is triton_http else GRPC_AUTH)  # a copy, as above
    result = client.infer("digits", [tensor], headers=auth)
    return result.as_numpy("probabilities")


def test_both_clients_embed_texts_with_their_defaults_and_agree_with_json(
    http_client, grpc_client
) -> None:
    binary = embed(http_client, triton_http)
    as_json = embed(http_client, triton_http, binary=False)
    over_grpc = embed(grpc_client, triton_grpc)
    assert binary.dtype == np.float32
    assert binary.shape[0] == len(TEXTS)
    np.testing.assert_allclose(binary, as_json, atol=1e-6)
    np.testing.assert_allclose(over_grpc, binary, atol=1e-6)


def test_both_clients_classify_digit_rows_exactly(http_client, grpc_client) -> None:
    rows = np.random.default_rng(0).random((5, 64), dtype=np.float32) * 16
    over_http = classify(http_client, triton_http, rows)
    over_grpc = classify(grpc_client, triton_grpc, rows)
    assert over_http.shape == (5, 10)
    np.testing.assert_allclose(over_grpc, over_http, atol=1e-6)
    np.testing.assert_allclose(over_http.sum(axis=1), 1.0, atol=1e-5)


def test_grpc_health_metadata_and_its_auth(grpc_client) -> None:
    assert grpc_client.is_server_live(headers=dict(GRPC_AUTH))
    assert grpc_client.is_server_ready(headers=dict(GRPC_AUTH))
    assert grpc_client.is_model_ready("digits", headers=dict(GRPC_AUTH))
    metadata = grpc_client.get_model_metadata("digits", headers=GRPC_AUTH, as_json=True)
    assert metadata["inputs"][0]["name"] == "input"
    with pytest.raises(InferenceServerException) as refused:
        classify_without_key(grpc_client)
    assert "UNAUTHENTICATED" in str(refused.value.status())


def classify_without_key(client: triton_grpc.InferenceServerClient) -> None:
    tensor = triton_grpc.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 64), dtype=np.float32))
    client.infer("digits", [tensor])
