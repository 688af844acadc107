"""``tritonclient.grpc``, unchanged, against the gateway's gRPC server (``serving`` from
``live_gateway``: the real HTTP and gRPC servers, replicas in-process): embeddings, a tensor
classifier, a text classifier and an ensemble answer as over HTTP; health and metadata;
auth, limits, deadlines and errors as the status codes of their HTTP twins, with the same
messages; the shard-key metadata reaches the replica as the header does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import live_gateway
import numpy as np
import pytest
import tritonclient.grpc as triton
import uvloop
from inprocess import InProcessHandle
from prometheus_client import REGISTRY
from tritonclient.utils import InferenceServerException

from serving.config import parse_config
from serving.gateway.core import GatewayCore
from serving.gateway.protocols import grpc_predict_v2_messages_pb2 as pb
from serving.gateway.protocols import grpc_predict_v2_pb2_grpc as generated
from serving.messages import ClassifyReply, EmbedReply, Envelope, InferCall, InferReply, ModelInfo
from serving.rollout.route_table import RouteFollower, RouteTable, VersionRoute
from serving.routing.sharding import SHARD_KEY_HEADER

LABELS = [str(d) for d in range(10)]
TOPICS = ["short", "long"]
KEY = "k" * 16
JOBS_ONLY_KEY = "j" * 16
MODELS = [
    {"name": "enc", "source": "enc", "task": "embed"},
    {"name": "digits", "source": "digits", "task": "classify"},
    {"name": "digits-b", "source": "digits-b", "task": "classify"},
    {"name": "topics", "source": "topics", "task": "classify"},
    {
        "name": "users",
        "source": "users",
        "task": "embed",
        "sharding": {"shards": 2, "key": "header"},
    },
    {"name": "slow", "source": "slow", "task": "embed"},
    {"name": "gen", "source": "gen", "task": "generate"},
    {
        "name": "digits-ens",
        "task": "classify",
        "ensemble": {"members": ["digits", "digits-b"], "combine": "mean"},
    },
]
NOT_READY = frozenset({"slow"})


@dataclass
class Replicas:
    """The in-process replicas' answers, and what reached them."""

    envelopes: dict[str, list[Envelope]] = field(default_factory=dict)
    """Per route-table entry (``users~0``, ``slow``, ...), each call's envelopes."""

    def seen(self, entry: str, call: InferCall) -> None:
        self.envelopes.setdefault(entry, []).extend(part.envelope for part in call.parts)

    def embed_by_length(self, entry: str, first: float | None = None) -> Any:
        """Each text's vector: [its length in characters (or ``first``), 1, 2, 3]."""

        async def answer(call: InferCall) -> InferReply[EmbedReply]:
            self.seen(entry, call)
            texts = list(call.inputs)
            head = [len(t) if first is None else first for t in texts]
            vectors = np.array([[h, 1, 2, 3] for h in head], dtype=np.float32)
            return InferReply(EmbedReply(vectors, (1,) * len(texts), "1"))

        return answer

    @staticmethod
    def pixels(offset: float) -> Any:
        """Each row's 'probabilities': its first 10 pixels plus ``offset``."""

        async def answer(call: InferCall) -> InferReply[ClassifyReply]:
            rows = np.asarray(call.inputs, dtype=np.float32)
            return InferReply(ClassifyReply(rows[:, :10] + offset, "1"))

        return answer

    @staticmethod
    async def by_text_length(call: InferCall) -> InferReply[ClassifyReply]:
        """A text classifier: [1, 0] for texts of up to 5 characters, else [0, 1]."""
        rows = [[1.0, 0.0] if len(t) <= 5 else [0.0, 1.0] for t in call.inputs]
        return InferReply(ClassifyReply(np.array(rows, dtype=np.float32), "1"))

    async def never(self, call: InferCall) -> InferReply[EmbedReply]:
        self.seen("slow", call)
        await asyncio.sleep(60)  # cancelled when the server stops
        raise AssertionError("unreachable")


def info(name: str, **fields: Any) -> Any:
    async def answer() -> ModelInfo:
        return {"name": name, "version": "1", **fields}  # type: ignore[typeddict-item]

    return answer


class ReadyBut(live_gateway.AllReady):
    async def model_ready(self, model: str) -> bool:
        return model not in NOT_READY


def gateway(replicas: Replicas, **server: Any) -> GatewayCore:
    config = parse_config({"server": server, "models": MODELS})
    tensor = {"task": "classify", "input": "tensor", "features": 64, "labels": LABELS}
    embed = {"task": "embed", "dim": 4}
    handles: dict[str, Any] = {
        "enc": InProcessHandle(replicas.embed_by_length("enc"), info("enc", **embed)),
        "digits": InProcessHandle(replicas.pixels(0.0), info("digits", **tensor)),
        "digits-b": InProcessHandle(replicas.pixels(1.0), info("digits-b", **tensor)),
        "topics": InProcessHandle(
            replicas.by_text_length,
            info("topics", task="classify", input="text", features=None, labels=TOPICS),
        ),
        # each shard's vectors start with its number: the answer says where it went
        "users~0": InProcessHandle(replicas.embed_by_length("users~0", 0), info("users", **embed)),
        "users~1": InProcessHandle(replicas.embed_by_length("users~1", 1), info("users", **embed)),
        "slow": InProcessHandle(replicas.never, info("slow", **embed)),
        "gen": live_gateway.FakeGenerator(),
    }

    async def no_board(*args: object) -> None:
        return None

    follower = RouteFollower(no_board)
    routes = {e: (VersionRoute(e, "1", 1.0, f"{e}-v1", h),) for e, h in handles.items()}
    follower.table = RouteTable(epoch=1, routes=routes)
    core = GatewayCore(config, follower, store=None)
    core.readiness = ReadyBut()  # type: ignore[assignment]
    return core


@dataclass(frozen=True)
class Live:
    replicas: Replicas
    http_url: str
    target: str

    def client(self) -> triton.InferenceServerClient:
        return triton.InferenceServerClient(self.target)

    def stub(self) -> tuple[grpc.Channel, generated.GRPCInferenceServiceStub]:
        """A plain gRPC stub (the generated one), for requests tritonclient never sends."""
        channel = grpc.insecure_channel(self.target)
        return channel, generated.GRPCInferenceServiceStub(channel)


@contextmanager
def live(run: Any = asyncio.run, **server: Any) -> Iterator[Live]:
    replicas = Replicas()
    with live_gateway.serving(lambda: gateway(replicas, **server), grpc=True, run=run) as at:
        yield Live(replicas, at.http_url, at.grpc_target)


@pytest.fixture(scope="module")
def gw() -> Iterator[Live]:
    """One gateway for the tests that change nothing of it (no keys, no limits)."""
    with live() as served:
        yield served


def texts_input(*texts: str) -> triton.InferInput:
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    return tensor


def rows_input(rows: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    return tensor


def refusal(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


def http_error(url: str, model: str, body: dict[str, Any]) -> str:
    answer = httpx.post(f"{url}/v2/models/{model}/infer", json=body)
    assert answer.status_code == 400
    return str(answer.json()["error"])


ROWS = (np.arange(3 * 64, dtype=np.float32).reshape(3, 64) % 17) / 16


# ---- the three model kinds, and an ensemble ------------------------------------------------


def test_tritonclient_grpc_embeds_texts_from_bytes_to_fp32_rows(gw: Live) -> None:
    result = gw.client().infer(
        "enc",
        [texts_input("hello", "caf\u00e9", "ok")],
        outputs=[triton.InferRequestedOutput("embedding")],
    )

    vectors = result.as_numpy("embedding")
    assert vectors.dtype == np.float32
    assert vectors.shape == (3, 4)
    assert vectors[:, 0].tolist() == [5.0, 4.0, 2.0]  # "café": 4 characters, 5 UTF-8 bytes
    response = result.get_response()
    assert (response.model_name, response.model_version) == ("enc", "1")
    assert len(response.raw_output_contents[0]) == 3 * 4 * 4  # raw FP32, as tritonclient reads


def test_tritonclient_grpc_classifies_pixel_rows_as_http_does(gw: Live) -> None:
    result = gw.client().infer("digits", [rows_input(ROWS)], request_id="r-7")

    np.testing.assert_array_equal(result.as_numpy("probabilities"), ROWS[:, :10])
    assert result.get_response().id == "r-7"  # the request's id, echoed
    over_http = httpx.post(
        f"{gw.http_url}/v2/models/digits/infer",
        json={
            "inputs": [
                {
                    "name": "input",
                    "shape": [3, 64],
                    "datatype": "FP32",
                    "data": ROWS.ravel().tolist(),
                }
            ]
        },
    ).json()
    np.testing.assert_array_equal(
        np.array(over_http["outputs"][0]["data"], dtype=np.float32).reshape(3, 10),
        result.as_numpy("probabilities"),
    )


def test_tritonclient_grpc_classifies_texts(gw: Live) -> None:
    result = gw.client().infer("topics", [texts_input("hi", "a longer text")])

    assert result.as_numpy("probabilities").tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_an_ensemble_answers_over_grpc_as_over_http_with_its_gather_in_parameters(
    gw: Live,
) -> None:
    result = gw.client().infer("digits-ens", [rows_input(ROWS)])
    over_http = httpx.post(
        f"{gw.http_url}/v2/models/digits-ens/infer",
        json={
            "inputs": [
                {
                    "name": "input",
                    "shape": [3, 64],
                    "datatype": "FP32",
                    "data": ROWS.ravel().tolist(),
                }
            ]
        },
    )

    expected = np.array(over_http.json()["outputs"][0]["data"], dtype=np.float32).reshape(3, 10)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected)
    parameters = result.get_response().parameters
    assert parameters["partial"].bool_param is False
    assert parameters["answered"].string_param == '["digits","digits-b"]'  # lists: as JSON
    assert result.get_response().model_version == over_http.json()["model_version"]


def test_typed_contents_answer_as_raw_contents_do(gw: Live) -> None:
    channel, stub = gw.stub()
    with channel:
        request = pb.ModelInferRequest(
            model_name="digits",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name="input",
                    datatype="FP32",
                    shape=[3, 64],
                    contents=pb.InferTensorContents(fp32_contents=ROWS.ravel().tolist()),
                )
            ],
        )
        texts = pb.ModelInferRequest(
            model_name="enc",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name="text",
                    datatype="BYTES",
                    shape=[2],
                    contents=pb.InferTensorContents(bytes_contents=[b"abc", b"abcdef"]),
                )
            ],
        )
        rows, vectors = stub.ModelInfer(request), stub.ModelInfer(texts)

    probabilities = np.frombuffer(rows.raw_output_contents[0], dtype="<f4").reshape(3, 10)
    np.testing.assert_array_equal(probabilities, ROWS[:, :10])
    assert np.frombuffer(vectors.raw_output_contents[0], dtype="<f4")[::4].tolist() == [3, 6]


def test_the_servers_loop_may_be_uvloops_as_in_a_gateway_replica() -> None:
    with live(run=uvloop.run) as served:
        result = served.client().infer("enc", [texts_input("hello")])

    assert result.as_numpy("embedding")[0, 0] == 5.0


# ---- health and metadata -------------------------------------------------------------------


def test_server_live_ready_and_metadata(gw: Live) -> None:
    client = gw.client()

    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "loom"
    assert metadata["extensions"] == httpx.get(f"{gw.http_url}/v2").json()["extensions"]


def test_model_metadata_and_readiness_say_what_http_says(gw: Live) -> None:
    client = gw.client()

    metadata = client.get_model_metadata("digits", as_json=True)
    over_http = httpx.get(f"{gw.http_url}/v2/models/digits").json()
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert metadata["outputs"][0]["shape"] == ["-1", "10"]  # int64 is a string in JSON
    assert (metadata["versions"], metadata["platform"]) == (
        over_http["versions"],
        over_http["platform"],
    )
    assert client.get_model_metadata("digits-ens", as_json=True)["outputs"][0]["name"] == (
        "probabilities"
    )
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits-ens")
    assert not client.is_model_ready("slow")  # its readiness says no (HTTP: 503)


# ---- errors: the HTTP error's message, as a gRPC status ------------------------------------


def test_an_unknown_model_is_not_found(gw: Live) -> None:
    error = refusal(lambda: gw.client().infer("nope", [texts_input("x")]))

    assert error.status() == "StatusCode.NOT_FOUND"
    assert error.message() == "model 'nope' does not exist"
    assert refusal(lambda: gw.client().is_model_ready("nope")).status() == "StatusCode.NOT_FOUND"


def test_a_wrong_shape_or_datatype_is_invalid_argument_with_https_message(gw: Live) -> None:
    narrow = rows_input(np.zeros((1, 3), dtype=np.float32))  # digits takes 64 features
    integers = triton.InferInput("input", [1, 64], "INT32")
    integers.set_data_from_numpy(np.zeros((1, 64), dtype=np.int32))

    shape = refusal(lambda: gw.client().infer("digits", [narrow]))
    datatype = refusal(lambda: gw.client().infer("digits", [integers]))

    assert shape.status() == datatype.status() == "StatusCode.INVALID_ARGUMENT"
    tensor = {"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [0, 0, 0]}
    assert shape.message() == http_error(gw.http_url, "digits", {"inputs": [tensor]})
    tensor = {"name": "input", "shape": [1, 64], "datatype": "INT32", "data": [0] * 64}
    assert datatype.message() == http_error(gw.http_url, "digits", {"inputs": [tensor]})
    assert "must have datatype FP32, got INT32" in datatype.message()


def test_a_generation_model_is_invalid_argument_naming_where_it_is_served(gw: Live) -> None:
    error = refusal(lambda: gw.client().infer("gen", [texts_input("x")]))

    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'gen' is a generate model, which ModelInfer does not serve" in error.message()


def test_raw_contents_past_their_data_are_invalid_argument_before_any_array(gw: Live) -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 64])
    element = pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1])
    short = pb.ModelInferRequest(
        model_name="digits", inputs=[tensor], raw_input_contents=[b"\0" * 100]
    )
    # one BYTES element declaring 100 bytes, 3 there
    past = pb.ModelInferRequest(
        model_name="enc",
        inputs=[element],
        raw_input_contents=[(100).to_bytes(4, "little") + b"abc"],
    )
    missing = pb.ModelInferRequest(model_name="digits", inputs=[tensor, tensor])
    channel, stub = gw.stub()
    with channel:
        errors = []
        for request in (short, past, missing):
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request)
            errors.append(caught.value)

    assert {e.code() for e in errors} == {grpc.StatusCode.INVALID_ARGUMENT}
    assert errors[0].details() == (
        "input 'input' has shape [1, 64] of FP32 (64 x 4 = 256 bytes) but 100 bytes of binary data"
    )
    assert errors[1].details() == (
        "input 'text': element 0 declares 100 bytes, past its tensor's data"
    )
    assert errors[2].details() == "input 'input' has no contents (nor raw_input_contents)"


def test_auth_missing_or_wrong_key_is_unauthenticated_a_key_without_the_scope_denied() -> None:
    keys = [{"name": "jobs-bot", "key": JOBS_ONLY_KEY, "scopes": ["jobs"]}]
    with live(api_keys=[KEY], keys=keys) as served:
        client = served.client()
        missing = refusal(lambda: client.infer("enc", [texts_input("x")]))
        wrong = refusal(
            lambda: client.infer(
                "enc", [texts_input("x")], headers={"authorization": "Bearer " + "w" * 16}
            )
        )
        unscoped = refusal(
            lambda: client.get_model_metadata(
                "enc", headers={"authorization": f"Bearer {JOBS_ONLY_KEY}"}
            )
        )
        allowed = client.infer(
            "enc", [texts_input("x")], headers={"authorization": f"Bearer {KEY}"}
        )
        live_without_a_key = client.is_server_live()  # a probe, as /v2/health/live

    assert (missing.status(), wrong.status()) == ("StatusCode.UNAUTHENTICATED",) * 2
    assert missing.message() == "missing API key: send 'Authorization: Bearer <key>'"
    assert wrong.message() == "invalid API key"
    assert unscoped.status() == "StatusCode.PERMISSION_DENIED"
    assert "lacks the 'infer' scope" in unscoped.message()
    assert allowed.as_numpy("embedding").shape == (1, 4)
    assert live_without_a_key


def test_the_shard_key_metadata_places_a_request_as_the_header_does() -> None:
    with live() as served:
        client = served.client()
        placed = {}
        for key in ("alice", "bob", "carol", "dave"):
            answer = client.infer("users", [texts_input("x")], headers={SHARD_KEY_HEADER: key})
            over_http = httpx.post(
                f"{served.http_url}/v2/models/users/infer",
                json={
                    "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]
                },
                headers={SHARD_KEY_HEADER: key},
            ).json()
            placed[key] = (answer.as_numpy("embedding")[0, 0], over_http["outputs"][0]["data"][0])
        reached = served.replicas.envelopes

    assert all(grpc_shard == http_shard for grpc_shard, http_shard in placed.values())
    keys_seen = {e.shard_key for entry in ("users~0", "users~1") for e in reached.get(entry, [])}
    assert keys_seen == {"alice", "bob", "carol", "dave"}  # the key reached the replica


def test_the_clients_deadline_is_the_requests_and_reaches_the_replica() -> None:
    with live() as served:  # request_timeout_s 60
        sent_s = time.time()
        error = refusal(
            lambda: served.client().infer("slow", [texts_input("x")], client_timeout=2.0)
        )
        deadlines = [e.deadline_s for e in served.replicas.envelopes["slow"]]

    assert error.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert len(deadlines) == 1
    assert deadlines[0] <= sent_s + 2.0 + 0.5  # the client's 2 s, not the server's 60


def test_past_the_servers_own_deadline_the_answer_is_deadline_exceeded() -> None:
    with live(request_timeout_s=0.5) as served:
        error = refusal(lambda: served.client().infer("slow", [texts_input("x")]))

    assert error.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert error.message() == "model slow did not answer within the deadline"  # HTTP's 504


def test_past_its_rate_limit_a_client_is_resource_exhausted_on_either_transport() -> None:
    limits = {"infer": {"rate_per_s": 0.001, "burst": 1}}  # one request, then ~17 min
    with live(rate_limits=limits) as served:
        first = served.client().infer("enc", [texts_input("x")])
        second = refusal(lambda: served.client().infer("enc", [texts_input("x")]))
        http_after = httpx.post(
            f"{served.http_url}/v2/models/enc/infer",
            json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]},
        )

    assert first.as_numpy("embedding").shape == (1, 4)
    assert second.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert second.message().startswith("rate limit of the infer routes exceeded; retry after")
    assert http_after.status_code == 429  # the same bucket: one client, either transport


def test_a_message_past_the_body_limit_is_refused_by_grpc_itself() -> None:
    with live(max_body_bytes=1024) as served:
        big = texts_input("x" * 2000)
        error = refusal(lambda: served.client().infer("enc", [big]))

    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "larger than max" in error.message()


def test_calls_are_counted_in_the_request_metrics_with_a_grpc_route(gw: Live) -> None:
    def count(model: str, status: str) -> float:
        labels = {"model": model, "route": "grpc_v2_infer", "status": status}
        return REGISTRY.get_sample_value("loom_requests_total", labels) or 0.0

    before = count("enc", "200"), count("", "404")
    gw.client().infer("enc", [texts_input("x")])
    refusal(lambda: gw.client().infer("nope", [texts_input("x")]))

    assert (count("enc", "200"), count("", "404")) == (before[0] + 1, before[1] + 1)
