"""The gateway's gRPC server: ``grpc.aio`` serving ``inference.GRPCInferenceService``
(``grpc_service``) on ``server.grpc_port``, beside the HTTP server on the same event loop of
each gateway replica, so a call and its hop to a model server cross no thread.

It is off unless ``server.grpc_port`` is set (``grpc_server_for`` gives None). It binds
``server.host`` as HTTP does, over TLS with ``server.tls``, and like HTTP refuses a port
already taken rather than share it (gRPC's default on Linux is SO_REUSEPORT: a second
process would silently split the traffic). Every gateway replica runs one, each on its own
node (``gateway_node_resource``), as for HTTP. Its limits come from the server's:

- a message larger than ``max_body_bytes`` is refused by gRPC itself (RESOURCE_EXHAUSTED,
  before any of it is decoded);
- metadata larger than ``max_header_bytes`` likewise;
- at most ``max_connections`` calls at once (one more: RESOURCE_EXHAUSTED), gRPC
  multiplexing many calls on one connection;
- a connection with no call for ``idle_timeout_s`` is closed.

    server = grpc_server_for(core)            # None without server.grpc_port
    await server.start()                      # bound and serving, or PortUnavailable
    await server.stop()
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from serving.config.server import ServerConfig
from serving.gateway.core import GatewayCore
from serving.gateway.grpc_service import InferenceService
from serving.gateway.http_server import PortUnavailable
from serving.gateway.protocols import grpc_predict_v2_pb2_grpc as generated

logger = logging.getLogger(__name__)

STOP_GRACE_S = 5.0
"""Calls under way when the server stops get this long to finish."""


def grpc_options(server: ServerConfig) -> list[tuple[str, int]]:
    """The channel arguments the server's limits become (module docstring)."""
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", server.max_body_bytes),
        ("grpc.max_metadata_size", server.max_header_bytes),
        ("grpc.max_connection_idle_ms", server.idle_timeout_s * 1000),
    ]


def server_credentials(certfile: str, keyfile: str) -> grpc.ServerCredentials:
    """TLS with the certificate chain in ``certfile`` and its key (PEM), as HTTPS uses."""
    chain = Path(certfile).read_bytes()
    key = Path(keyfile).read_bytes()
    return grpc.ssl_server_credentials([(key, chain)])


def listen_address(host: str, port: int) -> str:
    """``host:port`` as gRPC takes it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcServer:
    """One ``grpc.aio`` server for ``core``; ``port`` 0 takes any free one (tests)."""

    def __init__(
        self,
        core: GatewayCore,
        *,
        host: str,
        port: int,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self._core = core
        self._host, self._port = host, port
        self._credentials = credentials
        self._server: grpc.aio.Server | None = None

    @property
    def port(self) -> int:
        """The port it listens on: the one asked for, or the one given for port 0."""
        return self._port

    async def start(self) -> None:
        """Bind and serve on the running loop; ``PortUnavailable`` when the port is taken."""
        config = self._core.config.server
        server = grpc.aio.server(
            options=grpc_options(config), maximum_concurrent_rpcs=config.max_connections
        )
        generated.add_GRPCInferenceServiceServicer_to_server(InferenceService(self._core), server)
        address = listen_address(self._host, self._port)
        try:
            if self._credentials is None:
                bound = server.add_insecure_port(address)
            else:
                bound = server.add_secure_port(address, self._credentials)
        except RuntimeError as exc:  # grpc's words for a taken port: "Failed to bind"
            raise PortUnavailable(f"cannot serve gRPC on {address}: {exc}") from None
        if bound == 0:  # older grpc said so by a zero port
            raise PortUnavailable(f"cannot serve gRPC on {address}")
        self._port = bound
        await server.start()
        self._server = server
        logger.info(
            "gRPC (inference.GRPCInferenceService) on %s", listen_address(self._host, bound)
        )

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None


def grpc_server_for(core: GatewayCore) -> GrpcServer | None:
    """The gRPC server ``core``'s config asks for (its TLS too); None without
    ``server.grpc_port``."""
    server = core.config.server
    if server.grpc_port is None:
        return None
    tls = server.tls
    credentials = None if tls is None else server_credentials(tls.certfile, tls.keyfile)
    return GrpcServer(core, host=server.host, port=server.grpc_port, credentials=credentials)
