"""A version app in-process, for gateway tests without Ray: a stand-in for the Serve handle
that calls a replica object (or any coroutine) directly, and a ``GatewayCore`` whose route
table sends one model to it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from serving.config import LoomConfig
from serving.gateway.core import GatewayCore
from serving.messages import InferCall, InferReply, ModelInfo
from serving.rollout.route_table import RouteFollower, RouteTable, VersionRoute

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
