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

from typing import Any

from starlette.responses import JSONResponse, Response

from serving.gateway.body import read_body
from serving.gateway.core import GatewayCore
from serving.gateway.endpoint import Endpoints, Scope
from serving.gateway.errors import JSON
from serving.gateway.limits import check_texts
from serving.gateway.protocols import openai as oai
from serving.gateway.protocols import v2, v2_binary
from serving.messages import EmbedReply, Envelope, InferenceRequest, tensor_width
from serving.routing.ensemble_router import EnsembleAnswer, EnsembleRouter


def v2_ensemble_response(
    answer: EnsembleAnswer, *, model: str, task: str, request: v2.V2Infer
) -> v2.V2Answer:
    """The v2 infer response of a combined answer, with the gather in ``parameters``."""
    return v2.fp32_answer(
        v2.CLASSIFY_OUTPUT if task == "classify" else v2.EMBED_OUTPUT,
        answer.output,
        model=model,
        version=answer.version,
        request_id=request.body.id,
        binary=request.binary_outputs,
        parameters=answer.parameters(),
    )


async def ensemble_inputs(
    gw: GatewayCore, router: EnsembleRouter, body: v2.V2Infer
) -> tuple[Any, ...]:
    """The request's inputs, checked as the members take them: a classify ensemble asks its
    first member's info (tensor rows of its width, or texts); an embed ensemble takes texts.
    Limits are the ensemble entry's own (``limits``)."""
    limits = router.model.limits
    if router.model.task == "classify":
        width = tensor_width(await gw.model_info(router.members[0]))
        if width is not None:
            return tuple(v2.tensor_rows(body, features=width, max_rows=limits.max_inputs))
    texts = v2.text_inputs(body)
    check_texts(texts, limits)
    return texts


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


async def ensemble_metadata(gw: GatewayCore, router: EnsembleRouter) -> dict[str, Any]:
    """v2 metadata: the members' input, the combined output's shape, members and combine."""
    first = router.members[0]
    info = await gw.model_info(first)
    if router.model.task == "classify":
        meta = v2.classifier_metadata(
            first, [info["version"]], "", features=info["features"], labels=info["labels"]
        )
    else:
        dims: list[int | None] = [(await gw.model_info(m)).get("dim") for m in router.members]
        known = [d for d in dims if d]
        width = sum(known) if len(known) == len(dims) else None
        meta = v2.model_metadata(first, [info["version"]], width, "")
    return router.metadata(meta)


def add_ensemble_routes(endpoints: Endpoints, gw: GatewayCore) -> None:
    """The literal v2 routes of each ensemble in ``gw.ensembles``."""
    for name, router in gw.ensembles.items():
        _add_routes(endpoints, gw, name, router)


def _add_routes(endpoints: Endpoints, gw: GatewayCore, name: str, router: EnsembleRouter) -> None:
    @endpoints.post(f"/v2/models/{name}/infer", "v2_infer", tensor_body=True)
    async def infer(scope: Scope) -> Response:
        scope.model = name
        request = scope.request
        raw = await read_body(request, gw.max_body_bytes)
        body = v2.read_infer(raw, request.headers.get(v2_binary.HEADER_LENGTH))
        inputs = await ensemble_inputs(gw, router, body)
        envelope = gw.envelope(scope.request_id, request.headers, scope.arrived_s)
        answer = await router.infer(InferenceRequest(name, inputs, envelope))
        content = v2_ensemble_response(answer, model=name, task=router.model.task, request=body)
        return Response(
            content.content,
            media_type=content.media_type,
            headers={**answer.headers(), **content.headers},
        )

    @endpoints.get(f"/v2/models/{name}", "v2_model")
    async def metadata(scope: Scope) -> Response:
        scope.model = name
        return JSONResponse(await ensemble_metadata(gw, router))

    @endpoints.get(f"/v2/models/{name}/ready", "v2_ready")
    async def ready(scope: Scope) -> Response:
        scope.model = name
        is_ready = await router.ready()
        return JSONResponse({"name": name, "ready": is_ready}, status_code=200 if is_ready else 503)
