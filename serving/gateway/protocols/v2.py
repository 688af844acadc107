"""Open Inference Protocol v2 (KServe): server and model metadata, readiness, infer.

Embedding models take one input ``text`` (``BYTES``, shape ``[n]``) and give one output
``embedding`` (``FP32``, shape ``[n, dim]``, row-major flat data). Classifiers give one output
``probabilities`` (``FP32``, ``[n, classes]``) from either ``text`` (text classifiers) or
``input`` (``FP32``, ``[n, features]``: tensor classifiers such as ``digits``, 64 pixels a
row); model metadata names each column's label.

Answers are written with orjson from plain values; the models at the end (``InferResponse``,
``ModelMetadata``, ``V2Error``, ...) are their shapes for the OpenAPI document
(``routes.openapi``), checked against real answers by the schema fuzz test.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field

from serving.gateway.errors import ApiError, bad_request
from serving.messages import ClassifyReply, EmbedReply

SERVER_NAME = "loom"
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
    data: list[Any]
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    id: str | None = None
    inputs: list[TensorIn] = Field(min_length=1)
    parameters: dict[str, Any] | None = None


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


def text_inputs(request: InferRequest) -> tuple[str, ...]:
    """The texts of an embedding infer request; shape, datatype and data are checked."""
    tensor = _single_input(request, EMBED_INPUT)
    if tensor.datatype != "BYTES":
        raise bad_request(f"input '{EMBED_INPUT}' must have datatype BYTES, got {tensor.datatype}")
    if len(tensor.shape) != 1 or tensor.shape[0] < 0:
        raise bad_request(f"input '{EMBED_INPUT}' must have shape [n], got {tensor.shape}")
    data = _flatten(tensor.data)
    if len(data) != tensor.shape[0]:
        raise bad_request(
            f"input '{EMBED_INPUT}' has shape {tensor.shape} but {len(data)} data elements"
        )
    if not all(isinstance(x, str) for x in data):
        raise bad_request(f"input '{EMBED_INPUT}' data must be strings")
    return tuple(data)


def tensor_rows(request: InferRequest, *, features: int, max_rows: int) -> np.ndarray:
    """The FP32 rows of a tensor classifier's infer request, as an (n, features) array.

    Name, datatype, shape (rank 2, ``features`` wide, 1 to ``max_rows`` rows) and the data's
    length are checked before any array is built: shape [2, 64] needs 2 x 64 = 128 numbers,
    flat or nested. Too many rows is 413 (as too many texts is); anything else wrong is 400.
    """
    tensor = _single_input(request, TENSOR_INPUT)
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
    data = _flatten(tensor.data)
    if len(data) != rows * features:
        raise bad_request(
            f"{where} has shape {shape} ({rows} x {features} = {rows * features} elements) "
            f"but {len(data)} data elements"
        )
    # bool is an int to Python, but true/false are not pixels
    if not all(type(x) is float or type(x) is int for x in data):
        raise bad_request(f"{where} data must be numbers")
    try:
        values = np.array(data, dtype=np.float64)
    except OverflowError:  # an integer past float64's range
        values = np.array([np.inf])
    if not np.isfinite(values).all() or np.abs(values).max() > _FP32_MAX:
        raise bad_request(f"{where} data must be finite FP32 numbers")
    return values.astype(np.float32).reshape(rows, features)


def _infer_body(
    *, model: str, version: str, request_id: str | None, outputs: list[dict[str, Any]]
) -> bytes:
    body: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if request_id is not None:
        body["id"] = request_id
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def _fp32_output(name: str, matrix: np.ndarray) -> dict[str, Any]:
    return {
        "name": name,
        "shape": list(matrix.shape),
        "datatype": "FP32",
        "data": matrix.reshape(-1),  # row-major, as v2 lays out tensors
    }


def infer_response(reply: EmbedReply, *, model: str, request_id: str | None) -> bytes:
    output = _fp32_output(EMBED_OUTPUT, reply.vectors)
    return _infer_body(model=model, version=reply.version, request_id=request_id, outputs=[output])


def classify_response(reply: ClassifyReply, *, model: str, request_id: str | None) -> bytes:
    output = _fp32_output(CLASSIFY_OUTPUT, reply.probabilities)
    return _infer_body(model=model, version=reply.version, request_id=request_id, outputs=[output])


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
