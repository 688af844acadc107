"""A live gateway with no Ray: the real app (every route family, the jobs routes included)
served by the real ``HttpServer`` on 127.0.0.1, on an event loop of its own in a thread, so a
synchronous client (schemathesis, ``requests``, ``tritonclient``) talks to it over real
sockets; ``serving`` serves any core, and its gRPC server too (``grpc=True``).

Its three models answer in-process: ``enc`` (embed, 4 wide), ``digits`` (a tensor classifier,
64 features, 10 labels) and ``gen`` (generate: every choice is ``max_tokens`` copies of
"x", streamed one token a chunk). Jobs go to a SQLite store with no scheduler (they queue and
stay queued). Readiness reports every model ready (Serve's status needs Ray).

    with live_gateway(tmp_path, api_keys=["k" * 16]) as url:
        httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {'k' * 16}"})
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from inprocess import InProcessHandle, Method

from serving.config import parse_config
from serving.gateway.app import build_http_app
from serving.gateway.core import GatewayCore
from serving.gateway.grpc_server import GrpcServer
from serving.gateway.http_server import HttpLimits, HttpServer
from serving.gateway.routes.jobs import JobsSettings, build_jobs_service
from serving.messages import (
    ChoiceDelta,
    ClassifyReply,
    EmbedReply,
    GenerateCall,
    GenerateChunk,
    InferCall,
    InferReply,
    ModelInfo,
)
from serving.rollout.route_table import RouteFollower, RouteTable, VersionRoute
from training.api import JobsService
from training.spec import ClusterCapacity

LABELS = [str(d) for d in range(10)]
MODELS = [
    {"name": "enc", "source": "enc", "task": "embed"},
    {"name": "digits", "source": "digits", "task": "classify"},
    {"name": "gen", "source": "gen", "task": "generate"},
]
MAX_GENERATED_TOKENS = 64
"""The fake generator writes at most this many tokens per choice, whatever is asked."""


async def embed(call: InferCall) -> InferReply[EmbedReply]:
    n = len(call)
    return InferReply(EmbedReply(np.full((n, 4), 0.5, np.float32), (1,) * n, "1"))


async def classify(call: InferCall) -> InferReply[ClassifyReply]:
    n = len(call)
    return InferReply(ClassifyReply(np.full((n, 10), 0.1, np.float32), "1"))


class FakeGenerator:
    """What the gateway uses of a generation replica's handle: ``complete.remote(call)``, and
    ``options(stream=True).generate.remote(call)`` (an async iterator with ``cancel()``)."""

    def __init__(self) -> None:
        self.complete = Method(self._complete)
        self.generate = Method(self._stream)
        self.info = Method(self._info)

    def options(self, **_: Any) -> FakeGenerator:
        return self

    @staticmethod
    def _tokens(call: GenerateCall) -> int:
        return min(call.max_tokens or MAX_GENERATED_TOKENS, MAX_GENERATED_TOKENS)

    @staticmethod
    def _choices(call: GenerateCall) -> int:
        return max(len(call.prompts), 1) * call.n

    async def _complete(self, call: GenerateCall) -> GenerateChunk:
        tokens = self._tokens(call)
        deltas = tuple(
            ChoiceDelta(i, "x" * tokens, tokens, "length") for i in range(self._choices(call))
        )
        return GenerateChunk("1", deltas, (1,) * max(len(call.prompts), 1))

    def _stream(self, call: GenerateCall) -> Stream:
        return Stream(self._chunks(call))

    async def _chunks(self, call: GenerateCall) -> AsyncIterator[GenerateChunk]:
        yield GenerateChunk("1", (), (1,) * max(len(call.prompts), 1))
        tokens = self._tokens(call)
        for t in range(1, tokens + 1):
            finish = "length" if t == tokens else None
            yield GenerateChunk(
                "1", tuple(ChoiceDelta(i, "x", t, finish) for i in range(self._choices(call)))
            )

    async def _info(self) -> ModelInfo:
        return {"name": "gen", "version": "1", "task": "generate"}


class Stream:
    def __init__(self, chunks: AsyncIterator[GenerateChunk]) -> None:
        self._chunks = chunks

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> GenerateChunk:
        return await self._chunks.__anext__()

    def cancel(self) -> None:
        pass


class AllReady:
    """Readiness without Serve: every model deployed and ready."""

    async def status(self) -> dict[str, Any]:
        deployments = {m["name"]: {"status": "HEALTHY", "ready": True} for m in MODELS}
        return {"deployments": deployments}

    async def model_ready(self, model: str) -> bool:
        return True

    async def all_ready(self) -> bool:
        return True

    async def without_replicas(self, model: str) -> bool:
        return False


def gateway_core(home: Path, **server: Any) -> GatewayCore:
    config = parse_config({"server": server, "models": MODELS})

    async def no_board(*args: object) -> None:
        return None

    async def enc_info() -> ModelInfo:
        return {"name": "enc", "version": "1", "task": "embed", "dim": 4, "max_length": 128}

    async def digits_info() -> ModelInfo:
        return {
            "name": "digits",
            "version": "1",
            "task": "classify",
            "input": "tensor",
            "features": 64,
            "labels": LABELS,
        }

    handles: dict[str, Any] = {
        "enc": InProcessHandle(embed, enc_info),
        "digits": InProcessHandle(classify, digits_info),
        "gen": FakeGenerator(),
    }
    follower = RouteFollower(no_board)
    routes = {name: (VersionRoute(name, "1", 1.0, f"{name}-v1", h),) for name, h in handles.items()}
    follower.table = RouteTable(epoch=1, routes=routes)
    built = build_jobs_service(
        JobsSettings(db_url=f"sqlite:///{home / 'loom.db'}"), max_body_bytes=1 << 20
    )
    jobs = JobsService(
        store=built.store,
        capacity=lambda: ClusterCapacity(total_cpus=2, total_gpus=0),
        dataset_roots=(home,),
    )
    core = GatewayCore(config, follower, store=None, jobs=jobs)
    core.readiness = AllReady()  # type: ignore[assignment]
    return core


@dataclass(frozen=True)
class Addresses:
    http_url: str
    """``http://127.0.0.1:PORT``."""
    grpc_target: str
    """``127.0.0.1:PORT`` (what ``tritonclient.grpc`` takes); empty without ``grpc``."""


@contextmanager
def serving(
    core: Callable[[], GatewayCore],
    *,
    grpc: bool = False,
    run: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run,
) -> Iterator[Addresses]:
    """``core()`` (built on the server's loop) served over HTTP, and over gRPC with ``grpc``,
    each on a free port, on an event loop run by ``run`` (``asyncio.run``, ``uvloop.run``)."""
    started: Future[tuple[HttpServer, GrpcServer | None]] = Future()
    stop = threading.Event()

    async def serve() -> None:
        gateway = core()
        http = HttpServer(build_http_app(gateway), host="127.0.0.1", port=0, limits=HttpLimits())
        await http.start()
        rpc = GrpcServer(gateway, host="127.0.0.1", port=0) if grpc else None
        if rpc is not None:
            await rpc.start()
        started.set_result((http, rpc))
        while not stop.is_set():
            await asyncio.sleep(0.05)
        if rpc is not None:
            await rpc.stop(grace_s=0)
        await http.stop()

    def serve_in_thread() -> None:
        try:
            run(serve())
        except BaseException as exc:  # a start that failed: the caller sees why
            if not started.done():
                started.set_exception(exc)
            raise

    thread = threading.Thread(target=serve_in_thread, name="live-gateway", daemon=True)
    thread.start()
    http, rpc = started.result(timeout=60)
    try:
        target = "" if rpc is None else f"127.0.0.1:{rpc.port}"
        yield Addresses(f"http://127.0.0.1:{http.port}", target)
    finally:
        stop.set()
        thread.join(timeout=60)


@contextmanager
def live_gateway(home: Path, **server: Any) -> Iterator[str]:
    """The gateway served on a free port (``server`` is its ``server:`` section); its URL."""
    with serving(lambda: gateway_core(home, **server)) as addresses:
        yield addresses.http_url
