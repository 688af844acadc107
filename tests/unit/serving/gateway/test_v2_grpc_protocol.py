"""The v2 gRPC protocol without a server: the committed generated code is what protoc makes
of the .proto files; its messages are tritonclient's on the wire and live beside them in one
process; typed contents are checked as raw ones are; each HTTP status has its gRPC code; the
server is off without ``server.grpc_port`` and refuses a taken port."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as triton_pb

from serving.config import ConfigError, parse_config
from serving.gateway.core import GatewayCore
from serving.gateway.errors import ApiError
from serving.gateway.grpc_server import GrpcServer, grpc_options, grpc_server_for
from serving.gateway.http_server import PortUnavailable
from serving.gateway.protocols import grpc_codegen, v2_grpc
from serving.gateway.protocols import grpc_predict_v2_messages_pb2 as pb
from serving.gateway.protocols import grpc_predict_v2_pb2_grpc as generated
from serving.rollout.route_table import RouteFollower

METHODS = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
)
MESSAGES = (
    "ServerLiveRequest",
    "ServerLiveResponse",
    "ServerReadyRequest",
    "ServerReadyResponse",
    "ModelReadyRequest",
    "ModelReadyResponse",
    "ServerMetadataRequest",
    "ServerMetadataResponse",
    "ModelMetadataRequest",
    "ModelMetadataResponse",
    "ModelInferRequest",
    "ModelInferResponse",
    "InferParameter",
    "InferTensorContents",
)


def fields(descriptor) -> dict[str, tuple]:  # type: ignore[no-untyped-def]
    """Every field of a message and its nested messages: name -> (number, type, repeated)."""
    found = {
        f"{descriptor.name}.{f.name}": (f.number, f.type, f.is_repeated) for f in descriptor.fields
    }
    for nested in descriptor.nested_types:
        found.update({f"{descriptor.name}.{k}": v for k, v in fields(nested).items()})
    return found


def core(**server: object) -> GatewayCore:
    async def no_board(*args: object) -> None:
        return None

    config = parse_config({"server": server, "models": [{"name": "enc", "source": "enc"}]})
    return GatewayCore(config, RouteFollower(no_board), store=None)


# ---- the generated code --------------------------------------------------------------------


def test_the_committed_generated_code_is_what_protoc_makes_of_the_protos(tmp_path: Path) -> None:
    written = grpc_codegen.generate(tmp_path)

    for fresh, committed in zip(written, grpc_codegen.GENERATED, strict=True):
        assert fresh.read_text() == committed.read_text(), (
            f"{committed.name} differs from its .proto: run `make grpc-gen` and commit it"
        )


def test_every_message_has_tritonclients_fields_and_numbers() -> None:
    for name in MESSAGES:
        ours = fields(pb.DESCRIPTOR.message_types_by_name[name])
        theirs = fields(triton_pb.DESCRIPTOR.message_types_by_name[name])
        assert ours == theirs, name


def test_the_service_is_called_as_triton_calls_it() -> None:
    paths = []

    class Channel:
        def unary_unary(self, path: str, **kwargs: object) -> None:
            paths.append(path)

    generated.GRPCInferenceServiceStub(Channel())

    service = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert set(paths) == {f"/{service.full_name}/{method}" for method in METHODS}


def test_a_request_tritonclient_writes_reads_back_whole_in_our_messages() -> None:
    theirs = triton_pb.ModelInferRequest(model_name="digits", id="r-1")
    tensor = theirs.inputs.add(name="input", datatype="FP32", shape=[1, 2])
    tensor.parameters["p"].uint64_param = 7
    theirs.raw_input_contents.append(np.array([1.5, 2.5], "<f4").tobytes())

    ours = pb.ModelInferRequest.FromString(theirs.SerializeToString())

    assert ours.model_name == "digits"
    assert ours.id == "r-1"
    assert list(ours.inputs[0].shape) == [1, 2]
    assert ours.inputs[0].parameters["p"].uint64_param == 7
    assert v2_grpc.read_infer(ours).arrays["input"].tolist() == [[1.5, 2.5]]


# ---- typed contents ------------------------------------------------------------------------


def request(datatype: str, shape: list[int], **contents: object) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="input",
        datatype=datatype,
        shape=shape,
        contents=pb.InferTensorContents(**contents),  # type: ignore[arg-type]
    )
    return pb.ModelInferRequest(model_name="m", inputs=[tensor])


def test_typed_contents_become_arrays_of_the_declared_datatype_and_shape() -> None:
    rows = v2_grpc.read_infer(request("FP32", [2, 2], fp32_contents=[1, 2, 3, 4]))
    small = v2_grpc.read_infer(request("INT8", [3], int_contents=[-1, 0, 127]))
    texts = v2_grpc.read_infer(request("BYTES", [2], bytes_contents=[b"a", b"bc"]))

    assert rows.arrays["input"].dtype == np.float32
    assert rows.arrays["input"].tolist() == [[1, 2], [3, 4]]
    assert small.arrays["input"].dtype == np.int8
    assert texts.arrays["input"].tolist() == [b"a", b"bc"]
    assert rows.body.inputs[0].shape == [2, 2]


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (
            request("FP32", [2, 2], fp32_contents=[1, 2, 3]),
            "input 'input' has shape [2, 2] (4 elements) but 3 values in fp32_contents",
        ),
        (
            request("FP32", [1], int_contents=[1]),
            "input 'input' has datatype FP32, whose values go in fp32_contents, not int_contents",
        ),
        (
            request("INT8", [1], int_contents=[300]),
            "input 'input' has a value out of INT8's range",
        ),
        (
            request("FP32", [-1, 2], fp32_contents=[1, 2]),
            "input 'input': shape must be a list of whole numbers, got [-1, 2]",
        ),
        (
            request("FP16", [1], fp32_contents=[1]),
            "input 'input': FP16 has no typed contents; send raw_input_contents",
        ),
    ],
)
def test_typed_contents_that_do_not_fit_their_header_are_400(
    wrong: pb.ModelInferRequest, message: str
) -> None:
    with pytest.raises(ApiError) as caught:
        v2_grpc.read_infer(wrong)

    assert (caught.value.status, caught.value.message) == (400, message)


def test_raw_contents_must_be_one_per_input_and_alone() -> None:
    both = request("FP32", [1], fp32_contents=[1.0])
    both.raw_input_contents.append(b"\0\0\0\0")
    two = request("FP32", [1], fp32_contents=[1.0])
    two.raw_input_contents.extend([b"\0" * 4, b"\0" * 4])

    for wrong, expected in [
        (both, "input 'input' has contents and raw_input_contents: send one"),
        (two, "raw_input_contents has 2 entries but the request has 1 inputs"),
    ]:
        with pytest.raises(ApiError, match=expected.replace("(", r"\(")):
            v2_grpc.read_infer(wrong)


# ---- errors as status codes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (400, "invalid_request", grpc.StatusCode.INVALID_ARGUMENT),
        (413, "too_many_inputs", grpc.StatusCode.INVALID_ARGUMENT),
        (422, None, grpc.StatusCode.INVALID_ARGUMENT),
        (401, "missing_api_key", grpc.StatusCode.UNAUTHENTICATED),
        (403, "insufficient_scope", grpc.StatusCode.PERMISSION_DENIED),
        (404, "model_not_found", grpc.StatusCode.NOT_FOUND),
        (429, "rate_limit_exceeded", grpc.StatusCode.RESOURCE_EXHAUSTED),
        (503, "overloaded", grpc.StatusCode.RESOURCE_EXHAUSTED),
        (503, "model_not_ready", grpc.StatusCode.UNAVAILABLE),
        (503, "model_unavailable", grpc.StatusCode.UNAVAILABLE),
        (503, "replica_unavailable", grpc.StatusCode.UNAVAILABLE),
        (504, "timeout", grpc.StatusCode.DEADLINE_EXCEEDED),
        (504, "quorum_not_met", grpc.StatusCode.DEADLINE_EXCEEDED),
        (500, None, grpc.StatusCode.INTERNAL),
    ],
)
def test_each_http_status_has_the_grpc_code_of_its_meaning(
    status: int, code: str | None, expected: grpc.StatusCode
) -> None:
    assert v2_grpc.status_code(ApiError(status, "why", code=code)) == expected


# ---- the server ----------------------------------------------------------------------------


def test_without_a_grpc_port_there_is_no_grpc_server() -> None:
    assert grpc_server_for(core()) is None
    server = grpc_server_for(core(grpc_port=8081))
    assert server is not None
    assert server.port == 8081


def test_the_grpc_port_is_checked_like_the_http_one() -> None:
    for bad, why in [
        ({"grpc_port": 0}, "server.grpc_port: Input should be greater than or equal to 1"),
        ({"grpc_port": 70000}, "server.grpc_port: Input should be less than or equal to 65535"),
        ({"grpc_port": 8000}, "grpc_port and port are both 8000: give gRPC a port of its own"),
    ]:
        with pytest.raises(ConfigError, match=why):
            parse_config({"server": bad, "models": [{"name": "enc", "source": "enc"}]})
    config = parse_config(
        {"server": {"grpc_port": 8081}, "models": [{"name": "enc", "source": "enc"}]}
    )
    assert config.server.listen_ports == (8000, 8081)


def test_the_servers_limits_are_the_http_servers() -> None:
    options = dict(grpc_options(core(max_body_bytes=4096).config.server))

    assert options["grpc.max_receive_message_length"] == 4096
    assert options["grpc.so_reuseport"] == 0  # a taken port is an error, not a silent share


def test_a_taken_port_is_refused_not_shared() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]

    async def start() -> None:
        await GrpcServer(core(), host="127.0.0.1", port=port).start()

    with taken, pytest.raises(PortUnavailable, match=f"cannot serve gRPC on 127.0.0.1:{port}"):
        asyncio.run(start())
