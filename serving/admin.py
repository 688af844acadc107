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
from serving.errors import ApiError, bad_request

if TYPE_CHECKING:  # the gateway imports this module
    from serving.gateway import GatewayCore


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
