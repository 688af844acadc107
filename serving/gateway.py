"""The Gateway: the FastAPI ingress deployment every HTTP request enters by.

It authenticates, bounds body size, adapts the protocol (OpenAI, Open Inference Protocol v2)
to an ``InferenceRequest``, and hands the inputs to the model's router. Requests for one model
are joined into one call per batch (``Coalescer``) so an actor hop carries many requests.
Every error leaves in its protocol's shape; nothing escapes as a bare 500.
"""


import asyncio
import hmac
import time
import uuid
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from serving import metrics
from serving.body import parse_json, read_body, validate
from serving.coalescer import Coalescer
from serving.config import LoomConfig, ModelConfig
from serving.errors import (
    ApiError,
    Overloaded,
    error_body,
    model_not_found,
    overloaded,
    protocol_for_path,
)
from serving.protocols import openai as oai
from serving.protocols import v2
from serving.readiness import ReadinessCache
from serving.request import EmbedReply, InferenceRequest, check_inputs

JSON = "application/json"
SERVER_VERSION = "0.1.0"

app = FastAPI(title="Loom", version=SERVER_VERSION, docs_url=None, redoc_url=None, openapi_url=None)


def _error_response(error: ApiError, path: str) -> Response:
    return Response(
        error_body(error, protocol_for_path(path)),
        status_code=error.status,
        media_type=JSON,
        headers=error.headers,
    )


@app.exception_handler(ApiError)
async def _on_api_error(request: Request, exc: ApiError) -> Response:
    return _error_response(exc, request.url.path)


@app.exception_handler(StarletteHTTPException)
async def _on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
    message = "no such route" if exc.status_code == 404 else str(exc.detail)
    if exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    return _error_response(ApiError(exc.status_code, message, code="route_error"), request.url.path)


@app.exception_handler(RequestValidationError)
async def _on_validation_error(request: Request, exc: RequestValidationError) -> Response:
    return _error_response(
        ApiError(400, f"invalid request: {exc.errors()[0]['msg']}"), request.url.path
    )


@app.exception_handler(Exception)
async def _on_unexpected(request: Request, exc: Exception) -> Response:  # a bug: say so, no trace
    return _error_response(
        ApiError(500, f"internal error ({type(exc).__name__})"), request.url.path
    )


def split_reply(reply: EmbedReply, start: int, stop: int) -> EmbedReply:
    return EmbedReply(
        vectors=reply.vectors[start:stop],
        token_counts=reply.token_counts[start:stop],
        version=reply.version,
    )


@serve.ingress(app)
class Gateway:
    def __init__(self, config: dict, servers: dict[str, DeploymentHandle]) -> None:
        self._config = LoomConfig.model_validate(config)
        self._keys = tuple(k.encode() for k in self._config.server.api_keys)
        self._max_body_bytes = self._config.server.max_body_bytes
        self._timeout_s = self._config.server.request_timeout_s
        self._handles = servers
        self._coalescers = {
            m.name: self._coalescer(m, servers[m.name]) for m in self._config.models
        }
        self._info: dict[str, dict] = {}
        self._readiness = ReadinessCache(list(servers))
        self._created_s = int(time.time())

    @staticmethod
    def _coalescer(model: ModelConfig, handle: DeploymentHandle) -> Coalescer[EmbedReply]:
        replicas = model.autoscaling.max_replicas if model.autoscaling else (model.replicas or 1)
        return Coalescer(
            call=lambda texts: handle.embed.remote(texts),
            split=split_reply,
            max_batch_inputs=model.batching.max_batch_size,
            # one batch running and one on its way per replica keeps every engine busy
            max_in_flight=2 * replicas,
        )

    # ---- shared steps -------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if not self._keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key"
            )
        given = token.strip().encode()
        if not any(hmac.compare_digest(given, key) for key in self._keys):
            raise ApiError(401, "invalid API key", code="invalid_api_key")

    def _model(self, name: str) -> ModelConfig:
        model = self._config.model(name)
        if model is None:
            raise model_not_found(name)
        return model

    async def _infer(self, request: InferenceRequest) -> EmbedReply:
        remaining_s = request.deadline_s - time.time()
        try:
            return await asyncio.wait_for(
                self._coalescers[request.model].submit(request.inputs), remaining_s
            )
        except Overloaded as exc:
            raise overloaded(exc) from None
        except TimeoutError:
            raise ApiError(
                504, f"model {request.model} did not answer within the deadline", code="timeout"
            ) from None

    async def _measured(
        self,
        request: Request,
        route: str,
        handler: Callable[[dict[str, str]], Awaitable[Response]],
    ) -> Response:
        """Authorize, run ``handler``, count the answer by model, route and status.

        ``handler`` may fill in ``labels["model"]`` once it has read the body."""
        started = time.perf_counter()
        labels = {"model": ""}  # set only for a known model: no label per unknown name
        try:
            self._authorize(request)
            response = await handler(labels)
        except ApiError as exc:
            response = _error_response(exc, request.url.path)
        metrics.REQUESTS.labels(labels["model"], route, str(response.status_code)).inc()
        metrics.REQUEST_LATENCY.labels(labels["model"], route).observe(
            time.perf_counter() - started
        )
        return response

    def _request(self, model: str, inputs: tuple[str, ...], request: Request) -> InferenceRequest:
        return InferenceRequest(
            model=model,
            inputs=inputs,
            request_id=request.headers.get("x-request-id") or uuid.uuid4().hex,
            deadline_s=time.time() + self._timeout_s,
        )

    async def _model_info(self, name: str) -> dict:
        if name not in self._info:
            self._info[name] = await self._handles[name].info.remote()
        return self._info[name]

    # ---- OpenAI-compatible --------------------------------------------------------------

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        async def handle(labels: dict[str, str]) -> Response:
            body = validate(
                oai.EmbeddingsRequest, parse_json(await read_body(request, self._max_body_bytes))
            )
            model = self._model(body.model)
            labels["model"] = model.name
            texts = body.texts()
            check_inputs(
                texts,
                max_inputs=model.limits.max_inputs,
                max_input_chars=model.limits.max_input_chars,
            )
            reply = await self._infer(self._request(model.name, texts, request))
            content = oai.embeddings_response(
                reply,
                model=model.name,
                encoding_format=body.encoding_format,
                dimensions=body.dimensions,
            )
            return Response(content, media_type=JSON)

        return await self._measured(request, "embeddings", handle)

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        async def handle(labels: dict[str, str]) -> Response:
            cards = [oai.model_card(m.name, self._created_s) for m in self._config.models]
            return JSONResponse({"object": "list", "data": cards})

        return await self._measured(request, "models", handle)

    @app.get("/v1/models/{name}")
    async def retrieve_model(self, name: str, request: Request) -> Response:
        async def handle(labels: dict[str, str]) -> Response:
            labels["model"] = self._model(name).name
            return JSONResponse(oai.model_card(name, self._created_s))

        return await self._measured(request, "models", handle)

    @app.get("/v1/status")
    async def status(self, request: Request) -> Response:
        async def handle(labels: dict[str, str]) -> Response:
            return JSONResponse(await self._readiness.status())

        return await self._measured(request, "status", handle)

    # ---- Open Inference Protocol v2 -----------------------------------------------------

    @app.get("/v2")
    async def server_metadata(self, request: Request) -> Response:
        async def handle(labels: dict[str, str]) -> Response:
            return JSONResponse(
                {"name": v2.SERVER_NAME, "version": SERVER_VERSION, "extensions": []}
            )

        return await self._measured(request, "v2_metadata", handle)

    @app.get("/v2/health/live")
    async def live(self) -> Response:
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready")
    async def ready(self) -> Response:
        ready = await self._readiness.all_ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/v2/models/{name}")
    async def model_metadata(self, name: str, request: Request) -> Response:
        async def handle(labels: dict[str, str]) -> Response:
            model = self._model(name)
            labels["model"] = name
            info = await self._model_info(name)
            return JSONResponse(
                v2.model_metadata(
                    model.name, [info["version"]], info.get("dim"), "loom-" + model.task
                )
            )

        return await self._measured(request, "v2_model", handle)

    @app.get("/v2/models/{name}/ready")
    async def model_ready(self, name: str, request: Request) -> Response:
        async def handle(labels: dict[str, str]) -> Response:
            labels["model"] = self._model(name).name
            ready = await self._readiness.model_ready(name)
            return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)

        return await self._measured(request, "v2_ready", handle)

    @app.post("/v2/models/{name}/infer")
    async def infer(self, name: str, request: Request) -> Response:
        async def handle(labels: dict[str, str]) -> Response:
            model = self._model(name)
            labels["model"] = name
            body = validate(
                v2.InferRequest, parse_json(await read_body(request, self._max_body_bytes))
            )
            texts = v2.text_inputs(body)
            check_inputs(
                texts,
                max_inputs=model.limits.max_inputs,
                max_input_chars=model.limits.max_input_chars,
            )
            reply = await self._infer(self._request(model.name, texts, request))
            return Response(
                v2.infer_response(reply, model=model.name, request_id=body.id), media_type=JSON
            )

        return await self._measured(request, "v2_infer", handle)

    # ---- monitoring ---------------------------------------------------------------------

    @app.get("/metrics")
    async def metrics_text(self) -> Response:
        content = await asyncio.to_thread(metrics.render_latest)
        return Response(content, media_type=metrics.CONTENT_TYPE)
