"""Admin routes: what operators do to a running server over HTTP.

``POST /v1/admin/models/{name}/promote`` with ``{"version": "4"}`` moves the store alias the
served model ``name`` follows (its source ``NAME`` -> the ``serving`` alias, ``NAME#ALIAS`` ->
that alias), as ``loom models promote`` does; the rollout reconciler then rolls the new
version out. With API keys on, an admin route needs one of ``server.admin_api_keys``: no key
is 401, an ordinary key 403. Errors come in OpenAI's shape: unknown model 404, unknown
version 404, malformed version 400, a model pinned to a version or split by traffic 409.

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
"""

from __future__ import annotations

import asyncio
import hmac
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from models.errors import InvalidModelRef, ModelNotFound
from models.refs import ModelRef
from models.store import SERVING_ALIAS, ModelStore
from serving.body import parse_json, read_body, validate
from serving.config import ModelConfig
from serving.errors import ApiError, bad_request, model_not_found
from serving.ring import place
from serving.sharding import MAX_SHARDS

if TYPE_CHECKING:  # the gateway imports this module
    from serving.gateway import GatewayCore


class ReshardRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shards: int = Field(ge=1, le=MAX_SHARDS, description="The shard count to serve.")


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1, description="The store version the alias moves to.")


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


def require_admin(request: Request, admin_keys: tuple[bytes, ...], keys_on: bool) -> None:
    """403 unless the request's bearer key is an admin key (after the gateway's 401 check)."""
    if not keys_on:
        return
    _, _, token = request.headers.get("authorization", "").partition(" ")
    given = token.strip().encode()
    if not any(hmac.compare_digest(given, key) for key in admin_keys):
        raise ApiError(
            403, "this route needs an admin API key (server.admin_api_keys)", code="admin_required"
        )


def move_alias(store: ModelStore, name: str, alias: str, version: str) -> str | None:
    """Point ``alias`` of ``name`` at ``version``; return the version it pointed at before."""
    previous = store.aliases(name).get(alias)
    store.set_alias(name, alias, version)
    return previous


def add_admin_routes(app: FastAPI, gw: GatewayCore) -> None:
    server = gw.config.server
    admin_keys = tuple(key.encode() for key in server.admin_api_keys)

    @app.post("/v1/admin/models/{name}/promote")
    async def promote(name: str, request: Request) -> Response:
        async def handle(labels: dict[str, str]) -> Response:
            require_admin(request, admin_keys, server.keys_on)
            model = gw.model(name)
            labels["model"] = model.name
            body = validate(PromoteRequest, parse_json(await read_body(request, gw.max_body_bytes)))
            store_name, alias = promotion_target(model)
            try:
                previous = await asyncio.to_thread(
                    move_alias, gw.store, store_name, alias, body.version
                )
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

        return await gw.measured(request, "admin_promote", handle)

    @app.get("/v1/admin/shards")
    async def shard_map(request: Request) -> Response:
        async def handle(labels: dict[str, str]) -> Response:
            require_admin(request, admin_keys, server.keys_on)
            requested = await gw.shard_board.requested() if gw.shard_board else {}
            key = request.query_params.get("key")
            data = []
            for name, sharding in sorted(gw.shards.sharded.items()):
                members = [m for m, pool in gw.members.items() if pool.pool == name]
                entry = gw.shards.shard_map(name, members if sharding.key == "model" else ())
                entry["requested_shards"] = requested.get(
                    name, gw.config.model(name).sharding.shards
                )
                ring = gw.shards.ring(name)
                if key is not None and ring is not None:
                    entry["placed"] = {"key": key, "shard": place(ring, key)}
                data.append(entry)
            return JSONResponse({"object": "list", "data": data})

        return await gw.measured(request, "admin_shards", handle)

    @app.post("/v1/admin/shards/{name}")
    async def reshard(name: str, request: Request) -> Response:
        async def handle(labels: dict[str, str]) -> Response:
            require_admin(request, admin_keys, server.keys_on)
            model = gw.config.model(name)
            if model is None:
                raise model_not_found(name)
            labels["model"] = name
            if model.sharding is None or gw.shard_board is None:
                raise ApiError(
                    409,
                    f"model '{name}' is not sharded; give it a sharding section in the config",
                    code="not_sharded",
                )
            body = validate(ReshardRequest, parse_json(await read_body(request, gw.max_body_bytes)))
            before = await gw.shard_board.request(name, body.shards)
            previous = before if before is not None else model.sharding.shards
            return JSONResponse(
                {"model": name, "shards": body.shards, "previous": previous}, status_code=202
            )

        return await gw.measured(request, "admin_reshard", handle)
