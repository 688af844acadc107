"""A version app in-process, for gateway tests without Ray: a stand-in for the Serve handle
that calls a replica object (or any coroutine) directly, and a ``GatewayCore`` whose route
table sends one model to it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from serving.config import LoomConfig
from serving.gateway.core import GatewayCore
from serving.messages import GenerateCall, GenerateChunk, InferCall, InferReply, ModelInfo
from serving.rollout.route_table import RouteFollower, RouteTable, VersionRoute

if TYPE_CHECKING:
    from serving.replicas.generation import GenerationReplica

LOOPBACK_URL = "http://127.0.0.1"
"""The base URL of an in-process client: with no keys the gateway answers only a loopback
``Host`` (``serving.gateway.browser_guard``), and a test client's default is ``testserver``."""


class Method:
    """``handle.<method>.remote(...)``: here the coroutine itself, awaited by the caller."""

    def __init__(self, body: Callable[..., Awaitable[Any]]) -> None:
        self._body = body

    def remote(self, *args: Any) -> Awaitable[Any]:
        return self._body(*args)


class InProcessHandle:
    """What the gateway uses of a ``DeploymentHandle`` (``infer`` and ``info``), calling
    ``infer`` and ``info`` directly. Every reply given is kept in ``replies``."""

    def __init__(
        self,
        infer: Callable[[InferCall], Awaitable[InferReply[Any]]],
        info: Callable[[], Awaitable[ModelInfo]] | None = None,
    ) -> None:
        self.replies: list[InferReply[Any]] = []

        async def answer(call: InferCall) -> InferReply[Any]:
            reply = await infer(call)
            self.replies.append(reply)
            return reply

        self.infer = Method(answer)
        self.info = Method(info) if info is not None else None


def gateway_over(config: LoomConfig, model: str, handle: InProcessHandle) -> GatewayCore:
    """A gateway core whose route table sends ``model`` (version 1) to ``handle``."""

    async def no_board(*args: object) -> None:
        return None

    follower = RouteFollower(no_board)
    route = VersionRoute(model, "1", 1.0, f"{model}-v1", handle)
    follower.table = RouteTable(epoch=1, routes={model: (route,)})
    return GatewayCore(config, follower, store=None)


class _Remote:
    def __init__(self, body: Callable[[GenerateCall], Any]) -> None:
        self.remote = body


class _Stream:
    """``handle.options(stream=True).generate.remote(call)``: the replica's generator."""

    def __init__(self, chunks: AsyncIterator[GenerateChunk]) -> None:
        self._chunks = chunks

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> GenerateChunk:
        return await self._chunks.__anext__()

    def cancel(self) -> None:
        """Serve cancels the replica's generator; here it is closed (its ``finally`` frees
        the slots), as soon as the loop gets to it."""
        closing = self._chunks.aclose()  # type: ignore[attr-defined]
        asyncio.get_running_loop().create_task(closing)


class GenerationHandle:
    """What the generation routes use of a ``DeploymentHandle``, calling the replica."""

    def __init__(self, replica: GenerationReplica) -> None:
        self.complete = _Remote(replica.complete)
        self.generate = _Remote(lambda call: _Stream(replica.generate(call)))
        self.info = None

    def options(self, *, stream: bool) -> GenerationHandle:
        return self
