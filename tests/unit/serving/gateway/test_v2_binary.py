"""The v2 binary tensor data extension's codec (``protocols.v2_binary``), against the bodies
``tritonclient.http`` itself builds and reads with its defaults (``binary_data=True``): its
requests decode to the arrays it was given, our answers decode in its ``InferResult``, and
every size or offset that does not fit the body is a 400 before any array is built."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as triton

from serving.gateway.errors import ApiError
from serving.gateway.protocols.v2_binary import (
    binary_outputs,
    encode_response,
    encode_tensor,
    split_request,
)


def tritonclient_body(*inputs: triton.InferInput, **options: object) -> tuple[bytes, str | None]:
    body, json_size = triton.InferenceServerClient.generate_request_body(list(inputs), **options)
    return body, None if json_size is None else str(json_size)


def texts_input(texts: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object))  # binary_data=True: the default
    return tensor


def test_tritonclients_default_request_decodes_to_the_arrays_it_was_given() -> None:
    pixels = np.arange(2 * 64, dtype=np.float32).reshape(2, 64) / 7
    tensor = triton.InferInput("input", [2, 64], "FP32")
    tensor.set_data_from_numpy(pixels)
    body, length = tritonclient_body(tensor, outputs=[triton.InferRequestedOutput("probabilities")])

    header, arrays = split_request(body, length)

    assert header["inputs"][0]["parameters"] == {"binary_data_size": 2 * 64 * 4}  # 512 bytes
    assert "data" not in header["inputs"][0]
    np.testing.assert_array_equal(arrays["input"], pixels)
    assert binary_outputs(header, ["probabilities"]) == {"probabilities"}  # its default too


def test_bytes_elements_are_length_prefixed_and_come_back_whole() -> None:
    texts = [b"hello", b"", "caf\u00e9 \U0001f600".encode()]
    body, length = tritonclient_body(texts_input(texts))

    header, arrays = split_request(body, length)

    assert arrays["text"].tolist() == texts
    # 3 x 4 length bytes + 5 + 0 + 10 bytes of UTF-8
    assert header["inputs"][0]["parameters"]["binary_data_size"] == 12 + 5 + 0 + 10


def test_a_plain_json_request_has_no_binary_inputs() -> None:
    body = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                   "data": ["a"]}]}).encode()  # fmt: skip

    header, arrays = split_request(body, None)

    assert (header["inputs"][0]["data"], arrays) == (["a"], {})
    assert binary_outputs(header, ["embedding"]) == set()


def test_our_binary_answer_reads_back_in_tritonclients_result() -> None:
    matrix = np.linspace(-1, 1, 3 * 384, dtype=np.float32).reshape(3, 384)
    answer = {
        "model_name": "minilm",
        "model_version": "1",
        "outputs": [{"name": "embedding", "shape": [3, 384], "datatype": "FP32"}],
    }

    body, length = encode_response(answer, {"embedding": matrix}, binary={"embedding"})

    assert length is not None
    assert len(body) == length + 3 * 384 * 4
    result = triton.InferResult.from_response_body(body, header_length=length)
    np.testing.assert_array_equal(result.as_numpy("embedding"), matrix)
    assert result.get_response()["model_name"] == "minilm"


def test_an_answer_without_binary_outputs_is_plain_json() -> None:
    output = {"name": "probabilities", "shape": [1, 2], "datatype": "FP32"}
    answer = {"model_name": "d", "model_version": "1", "outputs": [output]}

    body, length = encode_response(
        answer, {"probabilities": np.array([[0.25, 0.75]], dtype=np.float32)}, binary=set()
    )

    assert length is None
    assert json.loads(body)["outputs"][0]["data"] == [0.25, 0.75]


def test_request_level_binary_data_output_asks_for_every_output() -> None:
    header = {"parameters": {"binary_data_output": True}, "inputs": []}
    one = {"outputs": [{"name": "embedding", "parameters": {"binary_data": True}},
                       {"name": "other", "parameters": {"binary_data": False}}]}  # fmt: skip

    assert binary_outputs(header, ["embedding", "norm"]) == {"embedding", "norm"}
    assert binary_outputs(one, ["embedding", "other"]) == {"embedding"}


@pytest.mark.parametrize("datatype", ["BOOL", "UINT8", "INT16", "INT32", "INT64", "FP16", "FP64"])
def test_every_numeric_datatype_round_trips_little_endian(datatype: str) -> None:
    values = np.array([[0, 1], [1, 0]]).astype(triton.triton_to_np_dtype(datatype))
    tensor = triton.InferInput("x", [2, 2], datatype)
    tensor.set_data_from_numpy(values)
    body, length = tritonclient_body(tensor)

    _, arrays = split_request(body, length)

    np.testing.assert_array_equal(arrays["x"], values)
    assert (
        encode_tensor(arrays["x"], datatype)
        == values.astype(values.dtype.newbyteorder("<")).tobytes()
    )


def bad(body: bytes, length: str | None) -> str:
    with pytest.raises(ApiError) as refused:
        split_request(body, length)
    assert refused.value.status == 400
    return str(refused.value.message)


def header_then(header: dict, tail: bytes) -> tuple[bytes, str]:
    head = json.dumps(header).encode()
    return head + tail, str(len(head))


def fp32(size: int, shape: list[int]) -> dict:
    return {"inputs": [{"name": "input", "shape": shape, "datatype": "FP32",
                        "parameters": {"binary_data_size": size}}]}  # fmt: skip


def test_sizes_and_offsets_past_the_body_are_refused_before_any_array() -> None:
    body, length = header_then(fp32(16, [1, 4]), b"\0" * 8)  # declares 16, carries 8

    assert "past the binary part's 8 bytes" in bad(body, length)
    assert "only" in bad(body, str(len(body) + 1))  # the header length past the body
    assert "whole number" in bad(body, "-3")
    assert "whole number" in bad(body, "12abc")


def test_sizes_that_do_not_add_up_or_match_the_shape_are_refused() -> None:
    extra, extra_length = header_then(fp32(16, [1, 4]), b"\0" * 20)
    short, short_length = header_then(fp32(12, [1, 4]), b"\0" * 12)

    assert "declare 16 bytes of binary data but the body carries 20" in bad(extra, extra_length)
    # the shape's arithmetic: [1, 4] of FP32 is 4 elements x 4 bytes = 16 bytes
    assert "(4 x 4 = 16 bytes) but 12 bytes" in bad(short, short_length)


def test_a_bytes_element_running_past_its_tensor_is_refused() -> None:
    chunk = (100).to_bytes(4, "little") + b"abc"  # claims 100 bytes, has 3
    header = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                          "parameters": {"binary_data_size": len(chunk)}}]}  # fmt: skip
    body, length = header_then(header, chunk)

    assert "declares 100 bytes, past its tensor's data" in bad(body, length)


def test_data_and_a_binary_size_together_and_an_unknown_datatype_are_refused() -> None:
    both = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"],
                        "parameters": {"binary_data_size": 5}}]}  # fmt: skip
    odd = {"inputs": [{"name": "x", "shape": [1], "datatype": "COMPLEX",
                       "parameters": {"binary_data_size": 8}}]}  # fmt: skip

    assert "both data and binary_data_size" in bad(*header_then(both, b"\1\0\0\0a"))
    assert "not one of v2's" in bad(*header_then(odd, b"\0" * 8))
    assert "not valid JSON" in bad(b"{nope" + b"\0" * 4, "5")
