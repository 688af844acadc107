"""Open Inference Protocol v2 (KServe): server and model metadata, readiness, infer.

Embedding models take one input ``text`` (``BYTES``, shape ``[n]``) and give one output
``embedding`` (``FP32``, shape ``[n, dim]``, row-major flat data). Classifiers give one output
``probabilities`` (``FP32``, ``[n, classes]``) from either ``text`` (text classifiers) or
``input`` (``FP32``, ``[n, features]``: tensor classifiers such as ``digits``, 64 pixels a
row); model metadata names each column's label.

An infer request is JSON, or JSON followed by raw tensor bytes (the binary tensor data
extension, ``v2_binary``: what ``tritonclient.http`` sends by default); ``read_infer`` reads
either, and an answer carries its outputs in binary where the request asks. Over gRPC
(``v2_grpc``) a protobuf request is read into the same ``V2Infer``, and the answer, a
``V2Result`` before either transport writes it, goes out as protobuf.

Answers are written with orjson from plain values; the models at the end (``InferResponse``,
``ModelMetadata``, ``V2Error``, ...) are their shapes for the OpenAPI document
(``routes.openapi``), checked against real answers by the schema fuzz test.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from serving.gateway.body import parse_json, validate
from serving.gateway.errors import ApiError, bad_request
from serving.gateway.protocols import v2_binary
from serving.messages import ClassifyReply, EmbedReply

SERVER_NAME = "loom"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data"]
"""The v2 extensions served, as server metadata names them (Triton's names)."""
EMBED_INPUT = "text"
EMBED_OUTPUT = "embedding"
TEXT_INPUT = EMBED_INPUT
TENSOR_INPUT = "input"
CLASSIFY_OUTPUT = "probabilities"
_FP32_MAX = float(np.finfo(np.float32).max)


class TensorIn(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = Field(
        None, description="Row-major values; absent when the tensor's bytes follow the JSON."
    )
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_size: the tensor's bytes after the JSON part."
    )


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data: true for this output's values as bytes after the JSON."
    )


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    id: str | None = None
    inputs: list[TensorIn] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_output: true for every output as bytes after the JSON."
    )


@dataclass(frozen=True, kw_only=True)
class V2Infer:
    """One infer request as read: its JSON part, the inputs whose bytes followed it (by
    name), and the outputs it asks for in binary."""

    body: InferRequest
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)
    binary_outputs: frozenset[str] = frozenset()


def read_infer(raw: bytes, length_header: str | None) -> V2Infer:
    """The request from its body: all JSON, or (with ``Inference-Header-Content-Length``)
    JSON then binary inputs, every size checked before an array is built."""
    data: object
    arrays: dict[str, np.ndarray] = {}
    if length_header is None:
        data = parse_json(raw)
    else:
        data, arrays = v2_binary.split_request(raw, length_header)
    body = validate(InferRequest, data)
    asked = v2_binary.binary_outputs(data, [EMBED_OUTPUT, CLASSIFY_OUTPUT])
    return V2Infer(body=body, arrays=arrays, binary_outputs=frozenset(asked))


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _single_input(request: InferRequest, name: str) -> TensorIn:
    if len(request.inputs) != 1 or request.inputs[0].name != name:
        names = [t.name for t in request.inputs]
        raise bad_request(f"expected exactly one input named '{name}', got {names}")
    return request.inputs[0]


def _data(request: V2Infer, tensor: TensorIn) -> list[Any] | np.ndarray:
    """The tensor's values: its bytes after the JSON (an array), or its JSON ``data``."""
    if tensor.name in request.arrays:
        return request.arrays[tensor.name]
    if tensor.data is None:
        raise bad_request(f"input '{tensor.name}' has no data (nor a binary_data_size)")
    return _flatten(tensor.data)


def _utf8(element: bytes) -> str:
    try:
        return element.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"input '{EMBED_INPUT}' is not valid UTF-8 (byte {exc.start})") from None


def text_inputs(request: V2Infer) -> tuple[str, ...]:
    """The texts of an embedding infer request; shape, datatype and data are checked."""
    tensor = _single_input(request.body, EMBED_INPUT)
    if tensor.datatype != "BYTES":
        raise bad_request(f"input '{EMBED_INPUT}' must have datatype BYTES, got {tensor.datatype}")
    if len(tensor.shape) != 1 or tensor.shape[0] < 0:
        raise bad_request(f"input '{EMBED_INPUT}' must have shape [n], got {tensor.shape}")
    values = _data(request, tensor)
    if isinstance(values, np.ndarray):  # decoded to shape, elements bytes
        return tuple(_utf8(element) for element in values.reshape(-1))
    data = values
    if len(data) != tensor.shape[0]:
        raise bad_request(
            f"input '{EMBED_INPUT}' has shape {tensor.shape} but {len(data)} data elements"
        )
    if not all(isinstance(x, str) for x in data):
        raise bad_request(f"input '{EMBED_INPUT}' data must be strings")
    return tuple(data)


def tensor_rows(request: V2Infer, *, features: int, max_rows: int) -> np.ndarray:
    """The FP32 rows of a tensor classifier's infer request, as an (n, features) array.

    Name, datatype, shape (rank 2, ``features`` wide, 1 to ``max_rows`` rows) and the data's
    length are checked before any array is built: shape [2, 64] needs 2 x 64 = 128 numbers,
    flat or nested. Too many rows is 413 (as too many texts is); anything else wrong is 400.
    """
    tensor = _single_input(request.body, TENSOR_INPUT)
    where = f"input '{TENSOR_INPUT}'"
    if tensor.datatype != "FP32":
        raise bad_request(f"{where} must have datatype FP32, got {tensor.datatype}")
    shape = tensor.shape
    if len(shape) != 2 or shape[1] != features:
        raise bad_request(f"{where} must have shape [n, {features}], got {shape}")
    rows = shape[0]
    if rows < 1:
        raise bad_request(f"{where} must have at least one row, got shape {shape}")
    if rows > max_rows:
        raise ApiError(
            413,
            f"{rows} rows exceed the limit of {max_rows} per request",
            code="too_many_inputs",
            param="input",
        )
    given = _data(request, tensor)
    if isinstance(given, np.ndarray):  # FP32 bytes, already shaped as declared
        values = given.astype(np.float64).reshape(-1)
    else:
        values = _numbers(given, where, rows * features, shape)
    if not np.isfinite(values).all() or np.abs(values).max() > _FP32_MAX:
        raise bad_request(f"{where} data must be finite FP32 numbers")
    return values.astype(np.float32).reshape(rows, features)


def _numbers(data: list[Any], where: str, count: int, shape: list[int]) -> np.ndarray:
    """JSON data as float64, its length and element types checked."""
    rows, features = shape
    if len(data) != count:
        raise bad_request(
            f"{where} has shape {shape} ({rows} x {features} = {rows * features} elements) "
            f"but {len(data)} data elements"
        )
    # bool is an int to Python, but true/false are not pixels
    if not all(type(x) is float or type(x) is int for x in data):
        raise bad_request(f"{where} data must be numbers")
    try:
        return np.array(data, dtype=np.float64)
    except OverflowError:  # an integer past float64's range
        return np.array([np.inf])


@dataclass(frozen=True, kw_only=True)
class V2Answer:
    """An infer answer's body; ``header_length`` is its JSON part's length when outputs
    follow it in binary (sent as ``Inference-Header-Content-Length``), else None."""

    content: bytes
    header_length: int | None = None

    @property
    def headers(self) -> dict[str, str]:
        if self.header_length is None:
            return {}
        return {v2_binary.HEADER_LENGTH: str(self.header_length)}

    @property
    def media_type(self) -> str:
        return "application/json" if self.header_length is None else "application/octet-stream"


def fp32_answer(
    output: str,
    matrix: np.ndarray,
    *,
    model: str,
    version: str,
    request_id: str | None,
    binary: frozenset[str] = frozenset(),
    parameters: dict[str, Any] | None = None,
) -> V2Answer:
    """One FP32 output, row-major (as v2 lays out tensors), in JSON or in binary."""
    answer: dict[str, Any] = {
        "model_name": model,
        "model_version": version,
        "outputs": [{"name": output, "shape": list(matrix.shape), "datatype": "FP32"}],
    }
    if parameters is not None:
        answer["parameters"] = parameters
    if request_id is not None:
        answer["id"] = request_id
    content, length = v2_binary.encode_response(answer, {output: matrix}, binary=set(binary))
    return V2Answer(content=content, header_length=length)


@dataclass(frozen=True, kw_only=True)
class V2Result:
    """One infer answer before a transport writes it (JSON or binary over HTTP, protobuf
    over gRPC): one FP32 output, row-major."""

    model: str
    version: str
    output: str
    """``embedding`` or ``probabilities``."""
    matrix: np.ndarray
    """(n, dim) vectors or (n, classes) probabilities."""
    parameters: dict[str, Any] | None = None
    """An ensemble's gather: partial, answered, failed, timed_out, hedged."""
    headers: dict[str, str] = field(default_factory=dict)
    """What the answer says beside its body (an ensemble's ``x-loom-ensemble-partial``)."""

    @classmethod
    def of_reply(cls, reply: EmbedReply | ClassifyReply, *, model: str) -> V2Result:
        """A replica's reply: ``embedding`` (n x dim) or ``probabilities`` (n x classes)."""
        if isinstance(reply, ClassifyReply):
            return cls(
                model=model,
                version=reply.version,
                output=CLASSIFY_OUTPUT,
                matrix=reply.probabilities,
            )
        return cls(model=model, version=reply.version, output=EMBED_OUTPUT, matrix=reply.vectors)


def infer_answer(result: V2Result, request: V2Infer) -> V2Answer:
    """The HTTP answer to ``request``: its outputs in JSON, or in binary where it asks."""
    return fp32_answer(
        result.output,
        result.matrix,
        model=result.model,
        version=result.version,
        request_id=request.body.id,
        binary=request.binary_outputs,
        parameters=result.parameters,
    )


def reply_answer(
    reply: EmbedReply | ClassifyReply,
    *,
    model: str,
    request_id: str | None,
    binary: frozenset[str] = frozenset(),
) -> V2Answer:
    """A replica's reply as the v2 answer: ``embedding`` (n x dim) or ``probabilities``
    (n x classes), one FP32 output."""
    result = V2Result.of_reply(reply, model=model)
    return fp32_answer(
        result.output,
        result.matrix,
        model=model,
        version=result.version,
        request_id=request_id,
        binary=binary,
    )


def model_metadata(name: str, versions: list[str], dim: int | None, platform: str) -> dict:
    return {
        "name": name,
        "versions": versions,
        "platform": platform,
        "inputs": [{"name": EMBED_INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": EMBED_OUTPUT, "datatype": "FP32", "shape": [-1, dim if dim else -1]}],
    }


def classifier_metadata(
    name: str,
    versions: list[str],
    platform: str,
    *,
    features: int | None,
    labels: list[str],
) -> dict:
    """A classifier's tensors: ``input`` FP32 [-1, features] when ``features`` is given,
    else ``text`` BYTES [-1]; ``probabilities`` FP32 [-1, classes], its columns' labels in
    the output's ``parameters``."""
    if features is not None:
        model_input = {"name": TENSOR_INPUT, "datatype": "FP32", "shape": [-1, features]}
    else:
        model_input = {"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]}
    output = {
        "name": CLASSIFY_OUTPUT,
        "datatype": "FP32",
        "shape": [-1, len(labels)],
        "parameters": {"labels": labels},
    }
    return {
        "name": name,
        "versions": versions,
        "platform": platform,
        "inputs": [model_input],
        "outputs": [output],
    }


# ---- the answers' shapes (for the OpenAPI document) ---------------------------------------


class V2Error(BaseModel):
    """Every 4xx and 5xx of a v2 route (``/v2``, ``/v2/...``)."""

    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a dimension of any size.")
    parameters: dict[str, Any] | None = None


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] | None = Field(
        None, description="An ensemble's members, combine, quorum and deadline_ms."
    )


class TensorOut(BaseModel):
    name: str
    shape: list[int]
    datatype: Literal["FP32"]
    data: list[float] = Field(description="Row-major, flat.")


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = Field(None, description="The request's id, when it gave one.")
    outputs: list[TensorOut]
    parameters: dict[str, Any] | None = Field(
        None, description="An ensemble's gather: partial, answered, failed, timed_out, hedged."
    )


class ModelReady(BaseModel):
    name: str
    ready: bool


class ServerReady(BaseModel):
    ready: bool


class ServerLive(BaseModel):
    live: bool
