"""HTTP routes of the ensembles: v2 ``infer``, metadata and readiness, and ``/v1/embeddings``
for a concat ensemble.

Each ensemble gets literal paths (``/v2/models/digits/infer``), added before the generic
``/v2/models/{name}/...`` routes (``routes.inference``) so they match first; every other
model keeps the generic routes. The answer is the combined output plus, in the v2
response's ``parameters``, who answered, failed, timed out and was hedged, and ``partial``;
the header ``x-loom-ensemble-partial`` says ``true`` or ``false`` on every protocol.

    POST /v2/models/digits/infer {"inputs": [{"name": "input", "datatype": "FP32",
                                              "shape": [1, 64], "data": [...]}]}
    -> {"model_name": "digits", "model_version": "digits-mlp@1+digits-cnn@1", "outputs": [...],
        "parameters": {"partial": false, "answered": [...], "failed": {}, "timed_out": [],
                       "hedged": []}}
"""

from __future__ import annotations

from starlette.responses import JSONResponse, Response

from serving.gateway import v2_service
from serving.gateway.body import read_body
from serving.gateway.core import GatewayCore
from serving.gateway.endpoint import Endpoints, Scope
from serving.gateway.errors import JSON
from serving.gateway.limits import check_texts
from serving.gateway.protocols import openai as oai
from serving.gateway.protocols import v2, v2_binary
from serving.messages import EmbedReply, Envelope, InferenceRequest
from serving.routing.ensemble_router import EnsembleRouter


async def ensemble_embeddings(
    router: EnsembleRouter, body: oai.EmbeddingsRequest, envelope: Envelope
) -> Response:
    """``POST /v1/embeddings`` for a concat ensemble (``body.model`` names it)."""
    texts = body.texts()
    check_texts(texts, router.model.limits)
    answer = await router.infer(InferenceRequest(router.name, texts, envelope))
    reply = EmbedReply(
        vectors=answer.output, token_counts=answer.token_counts, version=answer.version
    )
    content = oai.embeddings_response(
        reply, model=router.name, encoding_format=body.encoding_format, dimensions=body.dimensions
    )
    return Response(content, media_type=JSON, headers=answer.headers())


def add_ensemble_routes(endpoints: Endpoints, gw: GatewayCore) -> None:
    """The literal v2 routes of each ensemble in ``gw.ensembles``."""
    for name in gw.ensembles:
        _add_routes(endpoints, gw, name)


def _add_routes(endpoints: Endpoints, gw: GatewayCore, name: str) -> None:
    @endpoints.post(f"/v2/models/{name}/infer", "v2_infer", tensor_body=True)
    async def infer(scope: Scope) -> Response:
        scope.model = name
        request = scope.request
        raw = await read_body(request, gw.max_body_bytes)
        body = v2.read_infer(raw, request.headers.get(v2_binary.HEADER_LENGTH))
        envelope = gw.envelope(scope.request_id, request.headers, scope.arrived_s)
        route = f"/v2/models/{name}/infer"
        result = await v2_service.infer(gw, gw.model(name), body, envelope, route=route)
        answer = v2.infer_answer(result, body)
        return Response(
            answer.content,
            media_type=answer.media_type,
            headers={**result.headers, **answer.headers},
        )

    @endpoints.get(f"/v2/models/{name}", "v2_model")
    async def metadata(scope: Scope) -> Response:
        scope.model = name
        return JSONResponse(await v2_service.model_metadata(gw, gw.model(name)))

    @endpoints.get(f"/v2/models/{name}/ready", "v2_ready")
    async def ready(scope: Scope) -> Response:
        scope.model = name
        is_ready = await v2_service.model_ready(gw, gw.model(name))
        return JSONResponse({"name": name, "ready": is_ready}, status_code=200 if is_ready else 503)
