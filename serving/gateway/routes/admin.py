"""Admin routes: what operators do to a running server over HTTP.

``POST /v1/admin/models/{name}/promote`` with ``{"version": "4"}`` moves the store alias the
served model ``name`` follows (its source ``NAME`` -> the ``serving`` alias, ``NAME#ALIAS`` ->
that alias), as ``loom models promote`` does; the rollout reconciler then rolls the new
version out. With API keys on, promote needs the ``models`` scope and the shard routes
``admin`` (``scopes.ROUTE_SCOPES``): no key is 401, a key without the scope 403. Errors come
in OpenAI's shape: unknown model 404, unknown version 404, malformed version 400, a model
pinned to a version or split by traffic 409.

    curl -X POST localhost:8000/v1/admin/models/minilm/promote -H 'Authorization: Bearer ADMIN' \\
         -d '{"version": "2"}'
    # -> {"model": "minilm", "store_model": "minilm", "alias": "serving",
    #     "version": "2", "previous": "1"}

``GET /v1/admin/shards`` is the shard map of every sharded model: its routed shards, each
shard's version app, and for a pool keyed by model name which members each shard serves
(``?key=K`` adds the shard K goes to). ``POST /v1/admin/shards/{name}`` with
``{"shards": 5}`` reshards a running model (202): the reconciler starts the new shards and
moves the ring once they run (it stops removed ones after they drain). It lasts until the
server restarts: put the count in the config to keep it.

``GET /v1/admin/targets`` lists the gateway and every node's monitoring sidecar in
Prometheus's HTTP service-discovery format (``serving.monitoring.targets``), for an
``http_sd_configs`` entry (``deploy/monitoring/prometheus.yml``).
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from models.errors import InvalidModelRef, ModelNotFound
from models.refs import ModelRef
from models.store import SERVING_ALIAS
from serving.config import ModelConfig, PoolConfig
from serving.config.sharding import MAX_SHARDS
from serving.gateway.body import parse_json, read_body, validate
from serving.gateway.core import GatewayCore
from serving.gateway.endpoint import Endpoints, Scope
from serving.gateway.errors import ApiError, bad_request, model_not_found
from serving.monitoring.targets import http_sd
from serving.routing.ring import place


class ReshardRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    shards: int = Field(ge=1, le=MAX_SHARDS, description="The shard count to serve.")


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    version: str = Field(min_length=1, description="The store version the alias moves to.")


class PromoteResponse(BaseModel):
    model: str
    store_model: str = Field(description="The store model whose alias moved.")
    alias: str
    version: str
    previous: str | None = Field(description="The version the alias named before, if any.")


class ReshardResponse(BaseModel):
    model: str
    shards: int
    previous: int


class ShardMap(BaseModel):
    model: str
    key: str = Field(description="What places a request: model, header or request_id.")
    virtual_nodes: int
    routed_shards: int
    requested_shards: int
    epoch: int
    shards: dict[str, Any] = Field(description="Shard -> its versions, apps and keys.")
    placed: dict[str, Any] | None = Field(None, description="Where ?key=K goes.")


class ShardMapList(BaseModel):
    object: Literal["list"]
    data: list[ShardMap]


def promotion_target(model: ModelConfig) -> tuple[str, str]:
    """(store model, alias) that promoting ``model`` moves; 409 when its version cannot move."""
    ref = ModelRef.parse(model.source)
    if model.traffic is not None:
        raise ApiError(
            409,
            f"model '{model.name}' splits traffic between pinned versions in its config; "
            "change the config's traffic to move it",
            code="model_pinned",
        )
    if ref.version is not None:
        raise ApiError(
            409,
            f"model '{model.name}' is pinned to {ref}; only a model whose source is an alias "
            "(NAME or NAME#ALIAS) follows a promotion",
            code="model_pinned",
        )
    return ref.name, ref.alias or SERVING_ALIAS


def add_admin_routes(endpoints: Endpoints, gw: GatewayCore) -> None:
    @endpoints.post("/v1/admin/models/{name}/promote", "admin_promote")
    async def promote(scope: Scope) -> Response:
        model = gw.plain_model(scope.path_param("name"))
        scope.model = model.name
        data = parse_json(await read_body(scope.request, gw.max_body_bytes))
        body = validate(PromoteRequest, data)
        store_name, alias = promotion_target(model)
        if gw.store is None:
            raise ApiError(409, "this gateway has no model store", code="no_store")
        try:
            previous = await asyncio.to_thread(gw.store.set_alias, store_name, alias, body.version)
        except InvalidModelRef as exc:
            raise bad_request(str(exc), param="version") from None
        except ModelNotFound as exc:
            raise ApiError(404, str(exc), code="version_not_found", param="version") from None
        return JSONResponse(
            {
                "model": model.name,
                "store_model": store_name,
                "alias": alias,
                "version": body.version,
                "previous": previous,
            }
        )

    @endpoints.get("/v1/admin/shards", "admin_shards")
    async def shard_map(scope: Scope) -> Response:
        requested = await gw.shard_board.requested() if gw.shard_board else {}
        key = scope.request.query_params.get("key")
        data: list[dict[str, Any]] = []
        for name, sharding in sorted(gw.shards.sharded.items()):
            members = [m for m, pool in gw.members.items() if pool.pool == name]
            entry = gw.shards.shard_map(name, members if sharding.key == "model" else ())
            entry["requested_shards"] = requested.get(name, sharding.shards)
            ring = gw.shards.ring(name)
            if key is not None and ring is not None:
                entry["placed"] = {"key": key, "shard": place(ring, key)}
            data.append(entry)
        return JSONResponse({"object": "list", "data": data})

    @endpoints.get("/v1/admin/targets", "admin_targets")
    async def targets(scope: Scope) -> Response:
        sidecars = await gw.sidecars() if gw.sidecars is not None else []
        server = gw.config.server
        return JSONResponse(
            http_sd(gateway=gw.advertised_address, sidecars=sidecars, tls=server.tls is not None)
        )

    @endpoints.post("/v1/admin/shards/{name}", "admin_reshard")
    async def reshard(scope: Scope) -> Response:
        name = scope.path_param("name")
        model = gw.config.model(name)
        if model is None:
            raise model_not_found(name)
        scope.model = name
        sharding = model.sharding if isinstance(model, ModelConfig | PoolConfig) else None
        if sharding is None or gw.shard_board is None:
            raise ApiError(
                409,
                f"model '{name}' is not sharded; give it a sharding section in the config",
                code="not_sharded",
            )
        data = parse_json(await read_body(scope.request, gw.max_body_bytes))
        body = validate(ReshardRequest, data)
        before = await gw.shard_board.request(name, body.shards)
        previous = before if before is not None else sharding.shards
        return JSONResponse(
            {"model": name, "shards": body.shards, "previous": previous}, status_code=202
        )
