"""Open Inference Protocol v2 over gRPC: protobuf in and out of the shapes HTTP's v2 uses.

A ``ModelInferRequest`` becomes the same ``V2Infer`` an HTTP body does, so every check after
it (names, datatypes, shapes, limits) is the HTTP route's, with its message. Its values come
two ways, as the protocol allows:

- ``raw_input_contents``: one bytes field per input, in order, laid out as the HTTP binary
  extension lays a tensor (``v2_binary.decode_input``, every size checked before an array is
  built): what ``tritonclient.grpc`` sends;
- ``contents`` (``InferTensorContents``): the repeated field of the input's datatype
  (``fp32_contents`` for FP32, ``bytes_contents`` for BYTES, ...), its length checked
  against the shape.

An answer carries its output in ``raw_output_contents`` (what ``tritonclient.grpc`` reads),
an ensemble's gather in ``parameters``. An ``ApiError`` becomes a status code
(``status_code``) with the HTTP error's message as its details.

    request = read_infer(message)                       # a V2Infer, or ApiError 400
    response = infer_response(result, request_id=message.id)
    code = status_code(ApiError(404, "model 'x' does not exist"))   # NOT_FOUND
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np
import orjson

from serving.gateway.body import validate
from serving.gateway.errors import ApiError, bad_request
from serving.gateway.protocols import grpc_predict_v2_messages_pb2 as pb
from serving.gateway.protocols import v2, v2_binary

SERVICE_NAME = "inference.GRPCInferenceService"
"""The service as clients call it (``/inference.GRPCInferenceService/ModelInfer``)."""

CONTENTS_FIELDS: Mapping[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
"""The ``InferTensorContents`` field each datatype's values travel in (FP16 has none: raw
only)."""

STATUS_CODES: Mapping[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
"""Each HTTP status Loom answers as the gRPC code of the same meaning."""
OVERLOAD_CODES = frozenset({"overloaded", "too_many_connections"})
"""503s that mean "too much load, come back later" (a full queue shed the request):
RESOURCE_EXHAUSTED, as a rate limit is. Every other 503 (no version ready, a replica lost or
starting) is UNAVAILABLE."""


def status_code(error: ApiError) -> grpc.StatusCode:
    """The gRPC code a client hears for ``error`` (its details: ``error.message``)."""
    if error.status == 503 and error.code in OVERLOAD_CODES:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    code = STATUS_CODES.get(error.status)
    if code is not None:
        return code
    return grpc.StatusCode.INVALID_ARGUMENT if error.status < 500 else grpc.StatusCode.INTERNAL


# ---- requests -----------------------------------------------------------------------------


def read_infer(request: pb.ModelInferRequest) -> v2.V2Infer:
    """``request`` as HTTP's v2 reads a request: its inputs' headers validated as an
    ``InferRequest``, their values decoded to arrays (shaped as declared) by name."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise bad_request(
            f"raw_input_contents has {len(raw)} entries but the request has "
            f"{len(request.inputs)} inputs: send one per input, in order",
            param="raw_input_contents",
        )
    headers: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        header = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        where = f"input '{tensor.name}'"
        if raw:
            if tensor.HasField("contents"):
                raise bad_request(f"{where} has contents and raw_input_contents: send one")
            arrays[tensor.name] = v2_binary.decode_input(header, memoryview(raw[index]), where)
        elif tensor.HasField("contents"):
            arrays[tensor.name] = contents_array(tensor.contents, header, where)
        else:
            raise bad_request(f"{where} has no contents (nor raw_input_contents)")
        headers.append(header)
    body = validate(v2.InferRequest, {"id": request.id or None, "inputs": headers})
    return v2.V2Infer(body=body, arrays=arrays)


def contents_array(
    contents: pb.InferTensorContents, header: Mapping[str, Any], where: str
) -> np.ndarray:
    """Typed contents as an array of the declared shape: the values must be in the field of
    the datatype (and no other), as many as the shape holds (shape [2, 64]: 128)."""
    datatype = str(header["datatype"])
    shape = v2_binary.declared_shape(header, where)
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:
        if datatype == "FP16":
            raise bad_request(f"{where}: FP16 has no typed contents; send raw_input_contents")
        raise bad_request(f"{where}: datatype {datatype!r} is not one of v2's")
    for other in sorted(set(CONTENTS_FIELDS.values()) - {field}):
        if len(getattr(contents, other)):
            raise bad_request(
                f"{where} has datatype {datatype}, whose values go in {field}, not {other}"
            )
    values: Sequence[Any] = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise bad_request(
            f"{where} has shape {list(shape)} ({count} elements) but {len(values)} values "
            f"in {field}"
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    try:  # int_contents holds INT8 and INT16 values in 32 bits: 300 is no INT8
        return np.array(values, dtype=v2_binary.NUMERIC_DTYPES[datatype]).reshape(shape)
    except OverflowError:
        raise bad_request(f"{where} has a value out of {datatype}'s range") from None


# ---- answers ------------------------------------------------------------------------------


def infer_response(result: v2.V2Result, *, request_id: str) -> pb.ModelInferResponse:
    """The answer: its one FP32 output's bytes in ``raw_output_contents``, little-endian,
    row-major; an ensemble's gather in ``parameters``; ``request_id`` echoed (the request's
    ``id``)."""
    output = pb.ModelInferResponse.InferOutputTensor(
        name=result.output, datatype="FP32", shape=list(result.matrix.shape)
    )
    response = pb.ModelInferResponse(
        model_name=result.model,
        model_version=result.version,
        id=request_id,
        outputs=[output],
        raw_output_contents=[v2_binary.encode_tensor(result.matrix, "FP32")],
    )
    for key, value in (result.parameters or {}).items():
        response.parameters[key].CopyFrom(infer_parameter(value))
    return response


def infer_parameter(value: object) -> pb.InferParameter:
    """A parameter's value: a bool, int, float or string as itself; anything else (an
    ensemble's lists of members, its failures by member) as JSON text."""
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    if isinstance(value, str):
        return pb.InferParameter(string_param=value)
    return pb.InferParameter(string_param=orjson.dumps(value).decode())


def model_metadata_response(meta: Mapping[str, Any]) -> pb.ModelMetadataResponse:
    """HTTP's model metadata (``v2.ModelMetadata``'s shape) as protobuf. The protocol's
    tensor metadata has no parameters: a classifier's labels are HTTP's only."""
    return pb.ModelMetadataResponse(
        name=meta["name"],
        versions=list(meta["versions"]),
        platform=meta["platform"],
        inputs=[_tensor_metadata(tensor) for tensor in meta["inputs"]],
        outputs=[_tensor_metadata(tensor) for tensor in meta["outputs"]],
    )


def _tensor_metadata(tensor: Mapping[str, Any]) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=tensor["name"], datatype=tensor["datatype"], shape=list(tensor["shape"])
    )


def server_metadata_response(meta: Mapping[str, Any]) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(
        name=meta["name"], version=meta["version"], extensions=list(meta["extensions"])
    )
