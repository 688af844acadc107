"""Which scope each route needs: one table, keyed by the route's name in ``Endpoints``.

A route missing here needs only a valid key (``status``, ``openapi``); a route registered
with ``auth=False`` (health, metrics) needs none. The jobs router is one entry, ``jobs``
(every ``/v1/jobs`` route; who sees which job is ``training.api``'s rule).

    scope = ROUTE_SCOPES.get("admin_promote")     # "models"
"""

from __future__ import annotations

from collections.abc import Mapping

from serving.gateway.errors import ApiError
from training.callers import Caller, ScopeName

JOBS_ROUTE = "jobs"
"""The name every ``/v1/jobs`` route goes by here and in ``loom_requests_by_principal_total``."""

ROUTE_SCOPES: Mapping[str, ScopeName] = {
    "embeddings": "infer",
    "completions": "infer",
    "chat_completions": "infer",
    "models": "infer",
    "v2_metadata": "infer",
    "v2_model": "infer",
    "v2_ready": "infer",
    "v2_infer": "infer",
    JOBS_ROUTE: "jobs",
    "admin_promote": "models",
    "admin_shards": "admin",
    "admin_reshard": "admin",
    "admin_targets": "admin",
}


def route_family(route: str) -> str:
    """The low-cardinality label of a route in per-principal metrics: the scope it needs, or
    ``any`` for a route any key may call."""
    return ROUTE_SCOPES.get(route, "any")


def require_scope(caller: Caller, route: str) -> None:
    """403 ``insufficient_scope`` naming the scope unless ``caller`` holds the route's."""
    needed = ROUTE_SCOPES.get(route)
    if needed is not None and not caller.has(needed):
        raise ApiError(
            403,
            f"this key ({caller.principal}) lacks the '{needed}' scope this route needs",
            code="insufficient_scope",
            param=needed,
        )
