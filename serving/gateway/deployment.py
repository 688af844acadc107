"""The gateway deployment: the Serve replica every HTTP request enters by.

It follows the route table the reconciler publishes on the named board, builds one
``GatewayCore`` and the HTTP app over it, and with ``server.ingress: direct`` serves HTTP
itself on its own event loop (``HttpServer``, over TLS with ``server.tls``); with ``proxy``
Ray Serve's HTTP proxy forwards to it (``serve.ingress``). With ``server.grpc_port`` it also
serves the Open Inference Protocol over gRPC on that loop (``GrpcServer``), under either
ingress. Its config's keys are digests (``gateway.keys.hash_server_keys``): no key is in its
arguments.

    serve.deployment(Gateway).bind(config_dict, models_dir, board_name, jobs=...)
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve

from models.store import ModelStore
from serving.audit import AuditLog
from serving.config import LoomConfig
from serving.gateway.app import build_http_app
from serving.gateway.core import GatewayCore
from serving.gateway.grpc_server import grpc_server_for
from serving.gateway.http_server import HttpLimits, HttpServer, server_ssl_context
from serving.gateway.keys import KeyCheck
from serving.gateway.routes.jobs import JobsSettings, build_jobs_service
from serving.monitoring.sidecar_actor import KnownSidecars, NodeSidecars
from serving.monitoring.targets import advertised
from serving.replica_logging import route_to_serve_log
from serving.rollout.route_table import (
    BOARD_NAMESPACE,
    BoardShardRequests,
    RouteFollower,
    board_poller,
)


@serve.ingress()
class Gateway:
    """``jobs`` (``JobsSettings`` as a dict) adds the ``/v1/jobs`` routes."""

    # Serve awaits an async constructor (the HTTP server starts on the replica's loop)
    async def __init__(  # type: ignore[misc]
        self,
        config: dict[str, Any],
        models_dir: str,
        board_name: str,
        jobs: dict[str, Any] | None = None,
        audit_log: str | None = None,
    ) -> None:
        route_to_serve_log()
        loom_config = LoomConfig.model_validate(config)
        board = await asyncio.to_thread(ray.get_actor, board_name, namespace=BOARD_NAMESPACE)
        self._routes = RouteFollower(board_poller(board))
        jobs_service = None
        if jobs is not None:
            jobs_service = await asyncio.to_thread(
                build_jobs_service,
                JobsSettings.model_validate(jobs),
                max_body_bytes=loom_config.server.max_body_bytes,
            )
        server = loom_config.server
        monitoring = loom_config.monitoring
        stats_dir = None if monitoring.stats_dir is None else str(monitoring.stats_dir)
        sidecars = (
            KnownSidecars(stats_dir)
            if monitoring.sidecar_actor
            else NodeSidecars(monitoring.sidecar_port)
        )
        core = GatewayCore(
            loom_config,
            self._routes,
            ModelStore(Path(models_dir)),
            jobs_service,
            shard_board=BoardShardRequests(board),
            keys=KeyCheck.from_digests(loom_config.server),
            audit=None if audit_log is None else AuditLog(Path(audit_log)),
            sidecars=sidecars,
            advertised_address=advertised(server.host, server.port, ray.util.get_node_ip_address()),
        )
        self._routes.warm_up = core.warm
        self._routes.start()
        self._app = build_http_app(core)
        self._http: HttpServer | None = None
        if server.ingress == "direct":
            limits = HttpLimits.of(server)
            tls = server.tls
            context = None if tls is None else server_ssl_context(tls.certfile, tls.keyfile)
            self._http = HttpServer(
                self._app, host=server.host, port=server.port, limits=limits, ssl_context=context
            )
            await self._http.start()
        self._grpc = grpc_server_for(core)
        if self._grpc is not None:
            await self._grpc.start()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app

    async def __del__(self) -> None:
        if getattr(self, "_routes", None) is not None:
            await self._routes.stop()
        http = getattr(self, "_http", None)
        if http is not None:
            await http.stop()
        grpc = getattr(self, "_grpc", None)
        if grpc is not None:
            await grpc.stop()
