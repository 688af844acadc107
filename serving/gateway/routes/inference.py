"""Inference routes: OpenAI ``/v1/embeddings`` and ``/v1/models``, and the Open Inference
Protocol v2 (server metadata, model metadata and readiness, ``infer``) for embed and classify
models. An ensemble's own v2 routes are ``routes.ensembles``'; ``/v1/embeddings`` hands a
concat ensemble to it too.

    POST /v1/embeddings {"model": "minilm", "input": ["hello"]}
    POST /v2/models/digits-mlp/infer {"inputs": [{"name": "input", "datatype": "FP32", ...}]}
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse, Response

from serving.config import EnsembleEntry, ModelConfig
from serving.gateway.body import parse_json, read_body, validate
from serving.gateway.core import GatewayCore
from serving.gateway.endpoint import VERSION_HEADER, Endpoints, Scope
from serving.gateway.errors import JSON, wrong_route
from serving.gateway.limits import check_texts
from serving.gateway.protocols import openai as oai
from serving.gateway.protocols import v2, v2_binary
from serving.gateway.routes.ensembles import ensemble_embeddings
from serving.messages import EmbedReply, InferenceRequest, tensor_width

SERVER_VERSION = "0.1.0"


async def model_inputs(gw: GatewayCore, model: ModelConfig, body: v2.V2Infer) -> tuple[Any, ...]:
    """A v2 request's inputs, checked as ``model`` takes them: for a tensor classifier (its
    replica's info says so) FP32 rows of its width, else texts."""
    if model.task == "classify":
        width = tensor_width(await gw.model_info(model.name))
        if width is not None:
            max_rows = model.limits.max_inputs
            return tuple(v2.tensor_rows(body, features=width, max_rows=max_rows))
    texts = v2.text_inputs(body)
    check_texts(texts, model.limits)
    return texts


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
        return JSONResponse(
            {"name": v2.SERVER_NAME, "version": SERVER_VERSION, "extensions": v2.EXTENSIONS}
        )

    @endpoints.get("/v2/models/{name}", "v2_model")
    async def model_metadata(scope: Scope) -> Response:
        model = gw.plain_model(scope.path_param("name"))
        scope.model = model.name
        info = await gw.model_info(model.name)
        platform = "loom-" + model.task
        if model.task == "classify":
            meta = v2.classifier_metadata(
                model.name,
                [info["version"]],
                platform,
                features=info["features"],
                labels=info["labels"],
            )
        else:
            meta = v2.model_metadata(model.name, [info["version"]], info.get("dim"), platform)
        return JSONResponse(meta)

    @endpoints.get("/v2/models/{name}/ready", "v2_ready")
    async def model_ready(scope: Scope) -> Response:
        name = scope.path_param("name")
        scope.model = gw.model(name).name
        is_ready = await gw.readiness.model_ready(gw.routed_name(name))
        code = 200 if is_ready else 503
        return JSONResponse({"name": name, "ready": is_ready}, status_code=code)

    @endpoints.post("/v2/models/{name}/infer", "v2_infer", tensor_body=True)
    async def infer(scope: Scope) -> Response:
        name = scope.path_param("name")
        model = gw.plain_model(name)
        scope.model = model.name
        if model.task not in ("embed", "classify"):
            raise wrong_route(model.name, model.task, f"/v2/models/{name}/infer")
        request = scope.request
        raw = await read_body(request, gw.max_body_bytes)
        body = v2.read_infer(raw, request.headers.get(v2_binary.HEADER_LENGTH))
        inputs = await model_inputs(gw, model, body)
        envelope = gw.envelope(scope.request_id, request.headers, scope.arrived_s)
        reply = await gw.infer(InferenceRequest(model.name, inputs, envelope))
        answer = v2.reply_answer(
            reply, model=model.name, request_id=body.body.id, binary=body.binary_outputs
        )
        return Response(answer.content, media_type=answer.media_type, headers=answer.headers)
