"""The Gateway: the ingress deployment every HTTP request enters by.

It authenticates, bounds body size, adapts the protocol (OpenAI, Open Inference Protocol v2)
to an ``InferenceRequest``, and hands the inputs to the model's router. Requests for one model
are joined into one call per batch (``Coalescer``) so an actor hop carries many requests.
Every error leaves in its protocol's shape; nothing escapes as a bare 500.

The routes are one FastAPI app (``build_http_app``). With ``server.ingress: direct`` the
gateway replica serves it itself (``ThreadedHttpServer``); with ``proxy`` Ray Serve's HTTP
proxy forwards to it (``serve.ingress``).
"""

import asyncio
import contextlib
import hmac
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from models.store import ModelStore
from serving import metrics
from serving.admin import add_admin_routes
from serving.body import parse_json, read_body, validate
from serving.coalescer import Coalescer
from serving.config import LoomConfig, ModelConfig
from serving.ensemble_router import ensemble_routers
from serving.ensemble_routes import add_ensemble_routes, ensemble_embeddings
from serving.errors import (
    ApiError,
    InputRefused,
    Overloaded,
    bad_request,
    error_body,
    model_not_found,
    model_not_ready,
    overloaded,
    protocol_for_path,
)
from serving.faults import InjectedFault
from serving.generation_routes import add_generation_routes
from serving.http_server import HttpServer
from serving.jobs_service import JobsSettings, build_jobs_service
from serving.protocols import openai as oai
from serving.protocols import v2
from serving.readiness import ReadinessCache
from serving.request import (
    ClassifyReply,
    EmbedReply,
    InferenceRequest,
    check_inputs,
    pack_inputs,
)
from serving.route_table import (
    BOARD_NAMESPACE,
    NotRouted,
    RouteFollower,
    VersionRoute,
    board_poller,
)
from serving.shard_router import BoardShardRequests, ShardRouter
from serving.sharding import SHARD_KEY_HEADER, parse_shard_entry
from training.api import JobsService, build_jobs_router

JSON = "application/json"
SERVER_VERSION = "0.1.0"
Handler = Callable[[dict[str, str]], Awaitable[Response]]
WARM_TIMEOUT_S = 5.0
VERSION_HEADER = "x-loom-model-version"


def error_response(error: ApiError, path: str) -> Response:
    return Response(
        error_body(error, protocol_for_path(path)),
        status_code=error.status,
        media_type=JSON,
        headers=error.headers,
    )


# Where each task is served: the hint in the 400 a model gets on a route not for its task.
TASK_ROUTES = {
    "embed": "POST /v1/embeddings or POST /v2/models/{name}/infer",
    "classify": "POST /v2/models/{name}/infer",
    "generate": "POST /v1/completions or POST /v1/chat/completions",
}


def wrong_route(model: ModelConfig, route: str) -> ApiError:
    where = TASK_ROUTES.get(model.task)
    hint = f"; use {where.format(name=model.name)}" if where else ""
    return bad_request(
        f"model '{model.name}' is a {model.task} model, which {route} does not serve{hint}",
        param="model",
        code="wrong_model_task",
    )


def split_reply(reply: EmbedReply, start: int, stop: int) -> EmbedReply:
    return EmbedReply(
        vectors=reply.vectors[start:stop],
        token_counts=reply.token_counts[start:stop],
        version=reply.version,
    )


class GatewayCore:
    """What every route shares: auth, the model table, the route table (which version serves
    each request), deadlines, one coalescer per model version."""

    def __init__(
        self,
        config: LoomConfig,
        routes: RouteFollower,
        store: ModelStore,
        jobs: JobsService | None = None,
        shard_board: Any = None,
    ) -> None:
        """``routes`` picks each request's model version (``serving.route_table``); ``store``
        is the model store the admin routes move aliases in; ``jobs``, when given, serves the
        ``/v1/jobs`` routes (``training.api``); ``shard_board`` (the route board actor's
        ``request_shards``/``shard_requests``) takes resharding requests to the reconciler."""
        self.config = config
        self.jobs = jobs
        server = config.server
        self._keys = tuple(k.encode() for k in (*server.api_keys, *server.admin_api_keys))
        self.max_body_bytes = config.server.max_body_bytes
        self._timeout_s = config.server.request_timeout_s
        self.routes = routes
        self.store = store
        # one coalescer per version app and model (a pool's app serves several members): a
        # call joins requests for one version of one model only
        self._coalescers: dict[tuple[str, str], Coalescer] = {}
        self._info: dict[tuple[str, str], dict] = {}  # (app, model) -> its replica's info()
        self.members = config.pool_members()  # member -> its pool: the routed entry
        self._member_handles: dict[tuple[str, str], DeploymentHandle] = {}
        sharded = {m.name: m.sharding for m in config.models if m.sharding is not None}
        self.shards = ShardRouter(sharded, lambda: self.routes.table)
        self.shard_board = shard_board
        self.readiness = ReadinessCache([m.name for m in config.deployed()], routes.weights)
        self.created_s = int(time.time())
        self.ensembles = ensemble_routers(self)  # name -> its scatter/gather router

    @staticmethod
    def _coalescer(model: ModelConfig, handle: DeploymentHandle) -> Coalescer:
        replicas = model.autoscaling.max_replicas if model.autoscaling else (model.replicas or 1)

        def classify(inputs: list) -> Awaitable[ClassifyReply]:
            # feature rows travel as one (n, features) array, texts as a list
            return handle.classify.remote(pack_inputs(inputs))

        def embed(texts: list[str]) -> Awaitable[EmbedReply]:
            return handle.embed.remote(texts)

        is_classifier = model.task == "classify"
        call, split = (classify, ClassifyReply.rows) if is_classifier else (embed, split_reply)
        return Coalescer(
            call=call,
            split=split,
            max_batch_inputs=model.batching.max_batch_size,
            # up to 4 calls per replica: the replica's batcher merges what queues behind the
            # running batch. Measured at concurrency 8: 2 per replica ~70 req/s, 4 ~90, 8 ~73
            # (more calls, more hop cost); at 64 the three were within noise (~180-235).
            max_in_flight=4 * replicas,
        )

    def authorize(self, request: Request) -> None:
        if not self._keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key"
            )
        given = token.strip().encode()
        if not any(hmac.compare_digest(given, key) for key in self._keys):
            raise ApiError(401, "invalid API key", code="invalid_api_key")

    def handle(self, name: str) -> DeploymentHandle:
        """The deployment handle that serves model ``name`` now: the one accessor every route
        uses, so the rollout reconciler can change it under running traffic. Each call picks a
        version by the route table's weights. A version's app is deleted only after it leaves
        the table; Serve then lets its replicas finish what they hold (streams too)."""
        return self.route(name).handle

    def route(self, name: str, shard_key: str = "") -> VersionRoute:
        """The version one request of model ``name`` goes to; 503 while none is routed. A pool
        member goes to its pool's app, the handle naming the member (``multiplexed_model_id``).
        A sharded entry goes to the shard its ring gives the key: the member's or model's
        name (``sharding.key: model``) or ``shard_key`` (``header``)."""
        return self._for_member(name, self.routes.pick, shard_key, count=True)

    def _for_member(
        self,
        name: str,
        pick: Callable[[str], VersionRoute],
        shard_key: str = "",
        *,
        count: bool = False,
    ) -> VersionRoute:
        """``count``: a request goes there (``loom_shard_requests_total``), not a lookup."""
        member = self.members.get(name)
        routed = member.pool if member else name
        try:
            sharding = self.shards.sharded.get(routed)
            if sharding is not None:
                key = name if sharding.key == "model" else shard_key
                entry = self.shards.entry(routed, key)
                route = pick(entry)
                if count and (placed := parse_shard_entry(entry)) is not None:
                    metrics.SHARD_REQUESTS.labels(*placed).inc()  # (model, shard)
            else:
                route = pick(routed)
        except NotRouted:
            raise model_not_ready(name) from None
        if member is None:
            if sharding is not None:  # the shard's route, under the name clients call
                return VersionRoute(name, route.version, route.weight, route.app_name, route.handle)
            return route
        key = (route.app_name, name)
        handle = self._member_handles.get(key)
        if handle is None:
            handle = route.handle.options(multiplexed_model_id=member.ref)
            self._member_handles[key] = handle
        # the app stays the pool's: in-flight tracking (and so draining) is per app
        return VersionRoute(name, route.version, route.weight, route.app_name, handle)

    def routed_name(self, name: str) -> str:
        """The route-table entry serving ``name``: its pool for a member, else itself."""
        member = self.members.get(name)
        return member.pool if member else name

    def model(self, name: str) -> ModelConfig:
        """The config a callable name is served by (a pool member's: its pool's settings);
        404 for an unknown name or a pool's own name."""
        model = self.config.served(name)
        if model is None:
            raise model_not_found(name)
        return model

    def inference_request(
        self, model: str, inputs: tuple[object, ...], request: Request
    ) -> InferenceRequest:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        return InferenceRequest(
            model=model,
            inputs=inputs,
            request_id=request_id,
            deadline_s=time.time() + self._timeout_s,
            # a sharded model keyed by header: the client's key, else spread by request id
            shard_key=request.headers.get(SHARD_KEY_HEADER) or request_id,
        )

    async def infer(self, request: InferenceRequest) -> EmbedReply | ClassifyReply:
        remaining_s = request.deadline_s - time.time()
        route = self.route(request.model, request.shard_key)
        coalescer = self._coalescer_for(route)
        try:
            # counted in flight until answered: the reconciler deletes an old version only
            # once no gateway has a request left on it
            with self.routes.tracking(route.app_name):
                return await asyncio.wait_for(coalescer.submit(request.inputs), remaining_s)
        except Overloaded as exc:
            raise overloaded(exc) from None
        except InputRefused as exc:
            raise bad_request(exc.message, param="inputs") from None
        except InjectedFault as exc:  # config ``faults``: on purpose, so retry-able
            raise ApiError(503, str(exc), code="injected_fault") from None
        except TimeoutError:
            raise ApiError(
                504, f"model {request.model} did not answer within the deadline", code="timeout"
            ) from None

    def _coalescer_for(self, route: VersionRoute) -> Coalescer:
        key = (route.app_name, route.model)
        coalescer = self._coalescers.get(key)
        if coalescer is None:
            live = self.routes.app_names()  # forget versions no longer routed
            for old in [k for k in self._coalescers if k[0] not in live]:
                del self._coalescers[old]  # its queued requests still finish
            for old in [k for k in self._member_handles if k[0] not in live]:
                del self._member_handles[old]
            coalescer = self._coalescer(self.config.served(route.model), route.handle)
            self._coalescers[key] = coalescer
        return coalescer

    async def model_info(self, name: str) -> dict:
        """The info of the version that takes most of ``name``'s traffic."""
        route = self._for_member(name, self.routes.primary)
        key = (route.app_name, route.model)
        if key not in self._info:
            self._info[key] = await route.handle.info.remote()
        return self._info[key]

    async def warm(self, route: VersionRoute) -> None:
        """Before a new version is routed: its first call sets up the handle (so the first
        request does not), and its info is cached. Bounded: the follower waits for it."""
        with contextlib.suppress(Exception):
            info = await asyncio.wait_for(route.handle.info.remote(), WARM_TIMEOUT_S)
            self._info[(route.app_name, route.model)] = info

    async def measured(self, request: Request, route: str, handler: Handler) -> Response:
        """Authorize, run ``handler``, count the answer by model, route and status.

        ``handler`` sets ``labels["model"]`` once it knows the model is one of ours, so an
        unknown name never becomes a label."""
        started = time.perf_counter()
        labels = {"model": ""}
        try:
            self.authorize(request)
            response = await handler(labels)
        except ApiError as exc:
            response = error_response(exc, request.url.path)
        metrics.REQUESTS.labels(labels["model"], route, str(response.status_code)).inc()
        metrics.REQUEST_LATENCY.labels(labels["model"], route).observe(
            time.perf_counter() - started
        )
        return response


def build_http_app(gw: GatewayCore) -> FastAPI:
    """Every HTTP route of Loom, over ``gw``."""
    app = FastAPI(
        title="Loom", version=SERVER_VERSION, docs_url=None, redoc_url=None, openapi_url=None
    )
    _add_error_handlers(app)
    add_generation_routes(app, gw)
    add_ensemble_routes(app, gw)  # literal /v2/models/<ensemble>/... before the generic ones
    limits = {name: gw.model(name).limits for name in gw.config.served_names()}

    def checked(name: str, texts: tuple[str, ...]) -> None:
        check_inputs(
            texts, max_inputs=limits[name].max_inputs, max_input_chars=limits[name].max_input_chars
        )

    async def classifier_inputs(name: str, body: v2.InferRequest) -> tuple[object, ...]:
        """A classifier's inputs, checked against what its replica says it takes: feature
        rows (one 1-D array each) for a tensor model, texts for a text model."""
        info = await gw.model_info(name)
        if info["input"] == "tensor":
            max_rows = limits[name].max_inputs
            return tuple(v2.tensor_rows(body, features=info["features"], max_rows=max_rows))
        texts = v2.text_inputs(body)
        checked(name, texts)
        return texts

    # ---- OpenAI-compatible ----------------------------------------------------------

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        async def handle(labels: dict[str, str]) -> Response:
            data = parse_json(await read_body(request, gw.max_body_bytes))
            body = validate(oai.EmbeddingsRequest, data)
            model = gw.model(body.model)
            labels["model"] = model.name
            if model.task != "embed":
                raise wrong_route(model, "/v1/embeddings")
            if model.name in gw.ensembles:
                return await ensemble_embeddings(gw, gw.ensembles[model.name], body, request)
            texts = body.texts()
            checked(model.name, texts)
            reply = await gw.infer(gw.inference_request(model.name, texts, request))
            content = oai.embeddings_response(
                reply,
                model=model.name,
                encoding_format=body.encoding_format,
                dimensions=body.dimensions,
            )
            # which version answered: during a rollout or a canary split it varies
            headers = {VERSION_HEADER: reply.version}
            return Response(content, media_type=JSON, headers=headers)

        return await gw.measured(request, "embeddings", handle)

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        async def handle(labels: dict[str, str]) -> Response:
            cards = [oai.model_card(name, gw.created_s) for name in gw.config.served_names()]
            return JSONResponse({"object": "list", "data": cards})

        return await gw.measured(request, "models", handle)

    @app.get("/v1/models/{name}")
    async def retrieve_model(name: str, request: Request) -> Response:
        async def handle(labels: dict[str, str]) -> Response:
            labels["model"] = gw.model(name).name
            return JSONResponse(oai.model_card(name, gw.created_s))

        return await gw.measured(request, "models", handle)

    @app.get("/v1/status")
    async def status(request: Request) -> Response:
        async def handle(labels: dict[str, str]) -> Response:
            return JSONResponse(await gw.readiness.status())

        return await gw.measured(request, "status", handle)

    # ---- Open Inference Protocol v2 -------------------------------------------------

    @app.get("/v2")
    async def server_metadata(request: Request) -> Response:
        async def handle(labels: dict[str, str]) -> Response:
            return JSONResponse(
                {"name": v2.SERVER_NAME, "version": SERVER_VERSION, "extensions": []}
            )

        return await gw.measured(request, "v2_metadata", handle)

    @app.get("/v2/health/live")
    async def live() -> Response:
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        is_ready = await gw.readiness.all_ready()
        return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str, request: Request) -> Response:
        async def handle(labels: dict[str, str]) -> Response:
            model = gw.model(name)
            labels["model"] = name
            info = await gw.model_info(name)
            platform = "loom-" + model.task
            if model.task == "classify":
                meta = v2.classifier_metadata(
                    name,
                    [info["version"]],
                    platform,
                    features=info["features"],
                    labels=info["labels"],
                )
            else:
                meta = v2.model_metadata(name, [info["version"]], info.get("dim"), platform)
            return JSONResponse(meta)

        return await gw.measured(request, "v2_model", handle)

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str, request: Request) -> Response:
        async def handle(labels: dict[str, str]) -> Response:
            labels["model"] = gw.model(name).name
            is_ready = await gw.readiness.model_ready(gw.routed_name(name))
            code = 200 if is_ready else 503
            return JSONResponse({"name": name, "ready": is_ready}, status_code=code)

        return await gw.measured(request, "v2_ready", handle)

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        async def handle(labels: dict[str, str]) -> Response:
            model = gw.model(name)
            labels["model"] = name
            data = parse_json(await read_body(request, gw.max_body_bytes))
            body = validate(v2.InferRequest, data)
            if model.task == "classify":
                inputs = await classifier_inputs(name, body)
                reply = await gw.infer(gw.inference_request(model.name, inputs, request))
                content = v2.classify_response(reply, model=model.name, request_id=body.id)
                return Response(content, media_type=JSON)
            if model.task != "embed":
                raise wrong_route(model, f"/v2/models/{name}/infer")
            texts = v2.text_inputs(body)
            checked(name, texts)
            reply = await gw.infer(gw.inference_request(model.name, texts, request))
            content = v2.infer_response(reply, model=model.name, request_id=body.id)
            return Response(content, media_type=JSON)

        return await gw.measured(request, "v2_infer", handle)

    add_admin_routes(app, gw)
    if gw.jobs is not None:
        # the router answers its own errors; authorize's ApiError reaches _add_error_handlers
        app.include_router(build_jobs_router(gw.jobs, authorize=gw.authorize))

    # ---- monitoring -----------------------------------------------------------------

    @app.get("/metrics")
    async def metrics_text() -> Response:
        content = await asyncio.to_thread(metrics.render_latest)
        return Response(content, media_type=metrics.CONTENT_TYPE)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        if exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        error = ApiError(exc.status_code, message, code="route_error")
        return error_response(error, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        error = ApiError(400, f"invalid request: {exc.errors()[0]['msg']}")
        return error_response(error, request.url.path)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> Response:  # a bug: no trace
        error = ApiError(500, f"internal error ({type(exc).__name__})")
        return error_response(error, request.url.path)


@serve.ingress()
class Gateway:
    """The gateway deployment: ``serve.deployment(Gateway).bind(config_dict, models_dir,
    board_name, jobs=...)``; it follows the route table the reconciler publishes on the named
    board. ``jobs`` (``JobsSettings`` as a dict) adds the ``/v1/jobs`` routes."""

    async def __init__(
        self, config: dict, models_dir: str, board_name: str, jobs: dict | None = None
    ) -> None:
        loom_config = LoomConfig.model_validate(config)
        board = await asyncio.to_thread(ray.get_actor, board_name, namespace=BOARD_NAMESPACE)
        self._routes = RouteFollower(board_poller(board))
        jobs_service = None
        if jobs is not None:
            jobs_service = await asyncio.to_thread(
                build_jobs_service,
                JobsSettings.model_validate(jobs),
                max_body_bytes=loom_config.server.max_body_bytes,
            )
        core = GatewayCore(
            loom_config,
            self._routes,
            ModelStore(Path(models_dir)),
            jobs_service,
            shard_board=BoardShardRequests(board),
        )
        self._routes.warm_up = core.warm
        self._routes.start()
        self._app = build_http_app(core)
        self._http: HttpServer | None = None
        server = loom_config.server
        if server.ingress == "direct":
            self._http = HttpServer(self._app, host=server.host, port=server.port)
            await self._http.start()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._app

    async def __del__(self) -> None:
        if getattr(self, "_routes", None) is not None:
            await self._routes.stop()
        if getattr(self, "_http", None) is not None:
            await self._http.stop()
