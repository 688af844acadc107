"""Inference routes: OpenAI ``/v1/embeddings`` and ``/v1/models``, and the Open Inference
Protocol v2 (server metadata, model metadata and readiness, ``infer``) for embed and classify
models. An ensemble's own v2 routes are ``routes.ensembles``'; ``/v1/embeddings`` hands a
concat ensemble to it too. What v2 does past reading a request and before writing its answer
is ``v2_service``'s, which the gRPC service shares.

    POST /v1/embeddings {"model": "minilm", "input": ["hello"]}
    POST /v2/models/digits-mlp/infer {"inputs": [{"name": "input", "datatype": "FP32", ...}]}
"""

from __future__ import annotations

from starlette.responses import JSONResponse, Response

from serving.config import EnsembleEntry
from serving.gateway import v2_service
from serving.gateway.body import parse_json, read_body, validate
from serving.gateway.core import GatewayCore
from serving.gateway.endpoint import VERSION_HEADER, Endpoints, Scope
from serving.gateway.errors import JSON, wrong_route
from serving.gateway.limits import check_texts
from serving.gateway.protocols import openai as oai
from serving.gateway.protocols import v2, v2_binary
from serving.gateway.routes.ensembles import ensemble_embeddings
from serving.messages import EmbedReply, InferenceRequest


def add_inference_routes(endpoints: Endpoints, gw: GatewayCore) -> None:
    # ---- OpenAI-compatible ----------------------------------------------------------------

    @endpoints.post("/v1/embeddings", "embeddings")
    async def embeddings(scope: Scope) -> Response:
        request = scope.request
        data = parse_json(await read_body(request, gw.max_body_bytes))
        body = validate(oai.EmbeddingsRequest, data)
        model = gw.model(body.model)
        scope.model = model.name
        if model.task != "embed":
            raise wrong_route(model.name, model.task, "/v1/embeddings")
        envelope = gw.envelope(scope.request_id, request.headers, scope.arrived_s)
        if isinstance(model, EnsembleEntry):
            return await ensemble_embeddings(gw.ensembles[model.name], body, envelope)
        texts = body.texts()
        check_texts(texts, model.limits)
        reply = await gw.infer(InferenceRequest(model.name, texts, envelope))
        assert isinstance(reply, EmbedReply)
        content = oai.embeddings_response(
            reply,
            model=model.name,
            encoding_format=body.encoding_format,
            dimensions=body.dimensions,
        )
        return Response(content, media_type=JSON, headers={VERSION_HEADER: reply.version})

    @endpoints.get("/v1/models", "models")
    async def list_models(scope: Scope) -> Response:
        cards = [oai.model_card(name, gw.created_s) for name in gw.config.served_names()]
        return JSONResponse({"object": "list", "data": cards})

    @endpoints.get("/v1/models/{name}", "models")
    async def retrieve_model(scope: Scope) -> Response:
        name = scope.path_param("name")
        scope.model = gw.model(name).name
        return JSONResponse(oai.model_card(name, gw.created_s))

    # ---- Open Inference Protocol v2 -------------------------------------------------------

    @endpoints.get("/v2", "v2_metadata")
    async def server_metadata(scope: Scope) -> Response:
        return JSONResponse(v2_service.server_metadata())

    @endpoints.get("/v2/models/{name}", "v2_model")
    async def model_metadata(scope: Scope) -> Response:
        model = gw.plain_model(scope.path_param("name"))
        scope.model = model.name
        return JSONResponse(await v2_service.model_metadata(gw, model))

    @endpoints.get("/v2/models/{name}/ready", "v2_ready")
    async def model_ready(scope: Scope) -> Response:
        model = gw.model(scope.path_param("name"))
        scope.model = model.name
        is_ready = await v2_service.model_ready(gw, model)
        code = 200 if is_ready else 503
        return JSONResponse({"name": model.name, "ready": is_ready}, status_code=code)

    @endpoints.post("/v2/models/{name}/infer", "v2_infer", tensor_body=True)
    async def infer(scope: Scope) -> Response:
        name = scope.path_param("name")
        model = gw.plain_model(name)
        scope.model = model.name
        route = f"/v2/models/{name}/infer"
        v2_service.check_infer_task(model, route)  # before its body is read
        request = scope.request
        raw = await read_body(request, gw.max_body_bytes)
        body = v2.read_infer(raw, request.headers.get(v2_binary.HEADER_LENGTH))
        envelope = gw.envelope(scope.request_id, request.headers, scope.arrived_s)
        result = await v2_service.infer(gw, model, body, envelope, route=route)
        answer = v2.infer_answer(result, body)
        return Response(answer.content, media_type=answer.media_type, headers=answer.headers)
