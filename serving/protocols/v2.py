"""Open Inference Protocol v2 (KServe): server and model metadata, readiness, infer.

Embedding models take one input ``text`` (``BYTES``, shape ``[n]``) and give one output
``embedding`` (``FP32``, shape ``[n, dim]``, row-major flat data).
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

from serving.errors import bad_request
from serving.request import EmbedReply

SERVER_NAME = "loom"
EMBED_INPUT = "text"
EMBED_OUTPUT = "embedding"


class TensorIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    shape: list[int]
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

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


def text_inputs(request: InferRequest) -> tuple[str, ...]:
    """The texts of an embedding infer request; shape, datatype and data are checked."""
    if len(request.inputs) != 1 or request.inputs[0].name != EMBED_INPUT:
        names = [t.name for t in request.inputs]
        raise bad_request(f"expected exactly one input named '{EMBED_INPUT}', got {names}")
    tensor = request.inputs[0]
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


def infer_response(reply: EmbedReply, *, model: str, request_id: str | None) -> bytes:
    n, dim = reply.vectors.shape
    body: dict[str, Any] = {
        "model_name": model,
        "model_version": reply.version,
        "outputs": [
            {
                "name": EMBED_OUTPUT,
                "shape": [n, dim],
                "datatype": "FP32",
                "data": reply.vectors.reshape(-1),  # row-major, as v2 lays out tensors
            }
        ],
    }
    if request_id is not None:
        body["id"] = request_id
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def model_metadata(name: str, versions: list[str], dim: int | None, platform: str) -> dict:
    return {
        "name": name,
        "versions": versions,
        "platform": platform,
        "inputs": [{"name": EMBED_INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": EMBED_OUTPUT, "datatype": "FP32", "shape": [-1, dim if dim else -1]}],
    }
