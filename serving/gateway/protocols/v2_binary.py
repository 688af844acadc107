"""The v2 binary tensor data extension: a JSON header followed by raw tensor bytes.

What ``tritonclient.http`` sends by default (``binary_data=True``). The body is the JSON
request, ``Inference-Header-Content-Length`` bytes long, then each input that names
``parameters.binary_data_size`` in order, its bytes back to back: numeric types as
little-endian raw values in row-major order, ``BYTES`` as each element's length (4 bytes,
little-endian) followed by its bytes. An answer uses the same layout for the outputs the
request asks for in binary (``outputs[i].parameters.binary_data`` or the request's
``parameters.binary_data_output``).

Every length, size and offset is checked against the body before any array is built: a
header or a declared size past the body's end, sizes that do not add up to the body, a size
that is not the shape's element count times the datatype's width, or a ``BYTES`` element
running past its tensor are all 400, never a read past the end.

The same layout, one tensor a message field, is gRPC's ``raw_input_contents`` and
``raw_output_contents`` (``v2_grpc``), decoded here too (``decode_input``), with every check.

    header, inputs = split_request(body, request.headers.get(HEADER_LENGTH))
    request = InferRequest.model_validate(header)   # inputs[name]: an np.ndarray
    body, header_length = encode_response(answer, {"embedding": matrix}, binary={"embedding"})
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson

from serving.gateway.errors import bad_request

HEADER_LENGTH = "inference-header-content-length"
"""The HTTP header (either direction) holding the JSON part's length in bytes."""
BINARY_SIZE = "binary_data_size"

NUMERIC_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
"""v2 datatypes with a fixed width, as little-endian numpy dtypes (``BYTES`` has none)."""


def header_length(value: str | None, body_length: int) -> int | None:
    """The JSON part's length from the request header; None without one (plain JSON).
    400 for a value that is not a whole number within the body."""
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit():
        raise bad_request(f"{HEADER_LENGTH} must be a whole number of bytes, got {value!r}")
    length = int(text)
    if length > body_length:
        raise bad_request(f"{HEADER_LENGTH} is {length} bytes but the body has only {body_length}")
    return length


def split_request(body: bytes, length_header: str | None) -> tuple[Any, dict[str, np.ndarray]]:
    """The request's JSON (parsed) and its binary inputs by name, arrays shaped as declared.
    Without ``length_header`` the whole body is the JSON and there are no binary inputs."""
    length = header_length(length_header, len(body))
    head = body if length is None else body[:length]
    try:
        header = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"the JSON part of the body is not valid JSON: {exc}") from None
    if length is None:
        return header, {}
    return header, decode_inputs(header, memoryview(body)[length:])


def _declared_size(tensor: Mapping[str, Any], where: str) -> int | None:
    parameters = tensor.get("parameters")
    if not isinstance(parameters, Mapping) or BINARY_SIZE not in parameters:
        return None
    size = parameters[BINARY_SIZE]
    if type(size) is not int or size < 0:
        raise bad_request(f"{where}: {BINARY_SIZE} must be a whole number of bytes, got {size!r}")
    return size


def declared_shape(tensor: Mapping[str, Any], where: str) -> tuple[int, ...]:
    """A tensor's ``shape``, checked: a list of whole numbers, none negative."""
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad_request(f"{where}: shape must be a list of whole numbers, got {shape!r}")
    return tuple(shape)


def decode_inputs(header: Any, binary: memoryview) -> dict[str, np.ndarray]:
    """Each input declaring ``binary_data_size``, cut from ``binary`` in order and decoded;
    the declared sizes must add up to ``binary`` exactly."""
    inputs = header.get("inputs") if isinstance(header, Mapping) else None
    if not isinstance(inputs, list):
        raise bad_request("the request needs a list of inputs")
    decoded: dict[str, np.ndarray] = {}
    offset = 0
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, Mapping):
            continue  # the request's own validation names it
        name = str(tensor.get("name", index))
        where = f"input '{name}'"
        size = _declared_size(tensor, where)
        if size is None:
            continue
        if "data" in tensor:
            raise bad_request(f"{where} has both data and {BINARY_SIZE}: send one")
        if offset + size > len(binary):
            raise bad_request(
                f"{where} declares {size} bytes at offset {offset}, past the binary part's "
                f"{len(binary)} bytes"
            )
        decoded[name] = decode_input(tensor, binary[offset : offset + size], where)
        offset += size
    if offset != len(binary):
        raise bad_request(
            f"the inputs declare {offset} bytes of binary data but the body carries {len(binary)}"
        )
    return decoded


def decode_input(tensor: Mapping[str, Any], chunk: memoryview, where: str) -> np.ndarray:
    """One input's bytes as its header declares them (``datatype``, ``shape``): the
    extension's tensors here, and gRPC's ``raw_input_contents`` (``v2_grpc``)."""
    return decode_tensor(chunk, str(tensor.get("datatype")), declared_shape(tensor, where), where)


def decode_tensor(
    chunk: memoryview, datatype: str, shape: tuple[int, ...], where: str
) -> np.ndarray:
    """One tensor's bytes as an array of ``shape``: numeric datatypes little-endian, ``BYTES``
    as an object array of ``bytes``."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return decode_bytes(chunk, count, where).reshape(shape)
    dtype = NUMERIC_DTYPES.get(datatype)
    if dtype is None:
        raise bad_request(f"{where}: datatype {datatype!r} is not one of v2's")
    if len(chunk) != count * dtype.itemsize:
        raise bad_request(
            f"{where} has shape {list(shape)} of {datatype} ({count} x {dtype.itemsize} = "
            f"{count * dtype.itemsize} bytes) but {len(chunk)} bytes of binary data"
        )
    return np.frombuffer(chunk, dtype=dtype).reshape(shape)


def decode_bytes(chunk: memoryview, count: int, where: str) -> np.ndarray:
    """``count`` length-prefixed elements filling ``chunk`` exactly."""
    elements: list[bytes] = []
    offset = 0
    for index in range(count):
        if offset + 4 > len(chunk):
            raise bad_request(f"{where}: element {index} of {count} starts past its data")
        length = int.from_bytes(chunk[offset : offset + 4], "little")
        offset += 4
        if offset + length > len(chunk):
            raise bad_request(
                f"{where}: element {index} declares {length} bytes, past its tensor's data"
            )
        elements.append(bytes(chunk[offset : offset + length]))
        offset += length
    if offset != len(chunk):
        raise bad_request(
            f"{where}: {count} elements use {offset} bytes but {len(chunk)} were declared"
        )
    array = np.empty(count, dtype=object)
    array[:] = elements
    return array


def encode_tensor(array: np.ndarray, datatype: str) -> bytes:
    """``array`` as the extension lays it out (the inverse of ``decode_tensor``)."""
    if datatype == "BYTES":
        parts = []
        for element in array.reshape(-1):
            raw = element if isinstance(element, bytes) else str(element).encode()
            parts += [len(raw).to_bytes(4, "little"), raw]
        return b"".join(parts)
    dtype = NUMERIC_DTYPES.get(datatype)
    if dtype is None:
        raise ValueError(f"datatype {datatype!r} is not one of v2's")
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def binary_outputs(header: Any, names: Sequence[str]) -> set[str]:
    """Which of the model's outputs ``names`` the request asks for in binary: all with the
    request's ``parameters.binary_data_output``, else each output naming
    ``parameters.binary_data: true``."""
    if not isinstance(header, Mapping):
        return set()
    parameters = header.get("parameters")
    if isinstance(parameters, Mapping) and parameters.get("binary_data_output") is True:
        return set(names)
    asked = set()
    for output in header.get("outputs") or []:
        if not isinstance(output, Mapping):
            continue
        output_parameters = output.get("parameters")
        if isinstance(output_parameters, Mapping) and output_parameters.get("binary_data") is True:
            asked.add(str(output.get("name")))
    return asked & set(names)


def encode_response(
    answer: Mapping[str, Any], arrays: Mapping[str, np.ndarray], *, binary: set[str]
) -> tuple[bytes, int | None]:
    """The answer's body and its JSON part's length (None: all JSON). ``answer["outputs"]``
    holds each output's name, shape and datatype; its values come from ``arrays``: as
    ``data`` in the JSON, or after it as bytes for the outputs in ``binary``."""
    outputs = []
    tails: list[bytes] = []
    for output in answer["outputs"]:
        name, datatype = output["name"], output["datatype"]
        array = arrays[name]
        if name in binary:
            raw = encode_tensor(array, datatype)
            tails.append(raw)
            outputs.append({**output, "parameters": {BINARY_SIZE: len(raw)}})
        else:
            outputs.append({**output, "data": array.reshape(-1)})
    head = orjson.dumps({**answer, "outputs": outputs}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not tails:
        return head, None
    return head + b"".join(tails), len(head)
