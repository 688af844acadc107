"""``tritonclient.http`` with its defaults (the binary tensor data extension both ways)
against a live gateway (``live_gateway``: the real app and HTTP server, replicas in-process),
for an embedding model and a tensor classifier; the same request in JSON answers the same;
a declared size past the body is a 400 in v2's error shape."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import live_gateway
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from serving.messages import ClassifyReply, EmbedReply, InferCall, InferReply


async def embed_by_length(call: InferCall) -> InferReply[EmbedReply]:
    """Each text's vector is [its length in characters, 1, 2, 3]: the answer shows the text
    arrived whole."""
    texts = list(call.inputs)
    vectors = np.array([[len(t), 1, 2, 3] for t in texts], dtype=np.float32)
    return InferReply(EmbedReply(vectors, (1,) * len(texts), "1"))


async def classify_by_pixels(call: InferCall) -> InferReply[ClassifyReply]:
    """Each row's 'probabilities' are its first 10 pixels: the answer shows the rows arrived."""
    rows = np.asarray(call.inputs, dtype=np.float32)
    return InferReply(ClassifyReply(rows[:, :10].copy(), "1"))


@pytest.fixture
def url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setattr(live_gateway, "embed", embed_by_length)
    monkeypatch.setattr(live_gateway, "classify", classify_by_pixels)
    with live_gateway.live_gateway(tmp_path) as address:
        yield address


def client(url: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url.removeprefix("http://"))


def test_tritonclient_defaults_embed_texts_in_binary_both_ways(url: str) -> None:
    texts = np.array(["hello", "caf\u00e9", "ok"], dtype=object)
    tensor = triton.InferInput("text", [3], "BYTES")
    tensor.set_data_from_numpy(texts)  # binary_data=True, tritonclient's default

    result = client(url).infer("enc", [tensor], outputs=[triton.InferRequestedOutput("embedding")])

    vectors = result.as_numpy("embedding")
    assert vectors.shape == (3, 4)
    assert vectors[:, 0].tolist() == [5.0, 4.0, 2.0]  # "café" is 4 characters, 5 UTF-8 bytes
    output = result.get_response()["outputs"][0]
    assert output["parameters"] == {"binary_data_size": 3 * 4 * 4}  # came back as bytes
    assert "data" not in output


def test_tritonclient_defaults_classify_pixel_rows_and_json_answers_the_same(url: str) -> None:
    rows = (np.arange(4 * 64, dtype=np.float32).reshape(4, 64) % 17) / 16
    tensor = triton.InferInput("input", [4, 64], "FP32")
    tensor.set_data_from_numpy(rows)
    plain = triton.InferInput("input", [4, 64], "FP32")
    plain.set_data_from_numpy(rows, binary_data=False)

    binary = client(url).infer("digits", [tensor])  # no outputs named: all, in binary
    as_json = client(url).infer(
        "digits", [plain], outputs=[triton.InferRequestedOutput("probabilities", binary_data=False)]
    )

    np.testing.assert_array_equal(binary.as_numpy("probabilities"), rows[:, :10])
    np.testing.assert_array_equal(as_json.as_numpy("probabilities"), rows[:, :10])
    assert "data" in as_json.get_response()["outputs"][0]


def test_a_declared_size_past_the_body_is_a_400_in_v2s_error_shape(url: str) -> None:
    head = (
        b'{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",'
        b' "parameters": {"binary_data_size": 256}}]}'
    )
    answer = httpx.post(
        f"{url}/v2/models/digits/infer",
        content=head + b"\0" * 100,  # 256 declared, 100 sent
        headers={"Inference-Header-Content-Length": str(len(head))},
    )

    assert answer.status_code == 400
    assert "past the binary part's 100 bytes" in answer.json()["error"]


def test_tritonclient_hears_the_gateways_refusal_as_an_error(url: str) -> None:
    tensor = triton.InferInput("input", [1, 3], "FP32")  # digits wants 64 features
    tensor.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))

    with pytest.raises(InferenceServerException, match=r"shape \[n, 64\]"):
        client(url).infer("digits", [tensor])
