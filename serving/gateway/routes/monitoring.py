"""Monitoring routes: ``/metrics`` (Prometheus text), ``/v1/status`` (what is deployed and
ready), and the v2 health probes. Probes and scrapes need no key and are not counted as
traffic; ``/v1/status`` is both.
"""

from __future__ import annotations

import asyncio

from starlette.responses import JSONResponse, Response

from serving import metrics
from serving.gateway.core import GatewayCore
from serving.gateway.endpoint import Endpoints, Scope


def add_monitoring_routes(endpoints: Endpoints, gw: GatewayCore) -> None:
    @endpoints.get("/metrics", "metrics", auth=False, counted=False)
    async def metrics_text(scope: Scope) -> Response:
        content = await asyncio.to_thread(metrics.render_latest)
        return Response(content, media_type=metrics.CONTENT_TYPE)

    @endpoints.get("/v1/status", "status")
    async def status(scope: Scope) -> Response:
        return JSONResponse(await gw.readiness.status())

    @endpoints.get("/v2/health/live", "v2_live", auth=False, counted=False)
    async def live(scope: Scope) -> Response:
        return JSONResponse({"live": True})

    @endpoints.get("/v2/health/ready", "v2_ready_all", auth=False, counted=False)
    async def ready(scope: Scope) -> Response:
        is_ready = await gw.readiness.all_ready()
        return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)
