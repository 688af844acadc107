"""``GET /openapi.json``: the OpenAPI 3.1 document of every public route, made from the app's
own route list and the pydantic models of each route's request and answer.

Routes are registered with ``app.add_route`` (``Endpoints``), which FastAPI leaves out of its
own schema, so the document is built here: the paths and methods come from the app's routes
(the jobs router's included), each described by ``OPERATIONS`` under the route's name (its
metrics label; a jobs route's: its function's). The bodies' schemas are the protocol
modules' pydantic models (``EmbeddingsRequest``, ``InferRequest``, the job specs of every
registered trainer, ...); every error of a route is its protocol's error shape. A route with
no entry in ``OPERATIONS`` still appears, as an undescribed operation, and a unit test fails
on it; the schema fuzz test sends what the document allows and checks the answers against it.

With API keys on, the document and every route but health and metrics need a key, and the
document says so (``bearer``); with keys off it names no security.

    GET /openapi.json  -> {"openapi": "3.1.0", "info": {...}, "paths": {...}, "components": ...}
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, Field
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.responses import JSONResponse, Response

from serving.gateway.core import GatewayCore
from serving.gateway.endpoint import Endpoints, Scope
from serving.gateway.errors import protocol_for_path
from serving.gateway.protocols import openai as oai
from serving.gateway.protocols import openai_generation as gen_api
from serving.gateway.protocols import v2
from serving.gateway.routes import admin
from serving.monitoring.targets import TargetGroups
from training.api import MAX_IDEMPOTENCY_KEY_CHARS, MAX_LOG_LINES
from training.jobs import JobState
from training.trainers.registry import TRAINERS

OPENAPI_PATH = "/openapi.json"
JSON = "application/json"
SSE = "text/event-stream"
PROMETHEUS = "text/plain"
BINARY = "application/octet-stream"

Auth = Literal["key", "admin", "none"]


@dataclass(frozen=True, kw_only=True)
class Param:
    """A query parameter or header: its name, where, its JSON schema."""

    name: str
    where: Literal["query", "header"]
    schema: dict[str, Any]
    description: str = ""


@dataclass(frozen=True, kw_only=True)
class Operation:
    """One route's contract: what it takes, what it answers and how it fails."""

    summary: str
    tag: str
    body: type[BaseModel] | str | None = None
    """The request body's model, or the name of a schema built here (``JobSubmit``)."""
    answer: type[BaseModel] | None = None
    """The success body's model; None for a bare object (or text, by ``media``)."""
    status: int = 200
    also: tuple[int, ...] = ()
    """Other success statuses with the same body (a job submit's idempotent 200)."""
    media: str = JSON
    streams: bool = False
    """It may answer an SSE stream (``text/event-stream``) instead."""
    binary: bool = False
    """It may answer the v2 binary tensor extension (``application/octet-stream``) instead,
    when the request asks for an output in binary."""
    event: type[BaseModel] | None = None
    """The JSON each SSE event's ``data`` holds, when every event's is one shape."""
    errors: tuple[int, ...] = ()
    """Its own error statuses; the shared ones (401, 404 for a path, ...) are added."""
    params: tuple[Param, ...] = ()
    auth: Auth = "key"


# ---- shapes of the answers the other modules write ----------------------------------------


class TokenUsage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class CompletionChoice(BaseModel):
    index: int = Field(ge=0)
    text: str
    logprobs: None
    finish_reason: str | None = Field(description="stop, length, or null while streaming.")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: TokenUsage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int = Field(ge=0)
    message: AssistantMessage
    logprobs: None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: TokenUsage


class Job(BaseModel):
    """A job as ``training.api`` shows it; times in float seconds since the epoch."""

    id: str
    name: str
    trainer: str
    state: JobState
    stage: str | None
    progress: float
    metrics: dict[str, Any]
    error: str | None
    priority: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    spec: dict[str, Any]


class JobList(BaseModel):
    object: Literal["list"]
    data: list[Job]


class LogLine(BaseModel):
    seq: int
    time: float
    stage: str | None
    message: str


class LogList(BaseModel):
    object: Literal["list"]
    data: list[LogLine]


class CloudEvent(BaseModel):
    """One job event (CloudEvents 1.0, structured mode), the ``data`` of an SSE event."""

    specversion: Literal["1.0"]
    id: str = Field(description="<job id>-<seq>: the same on every resend.")
    source: str
    type: str = Field(description="e.g. loom.job.state_changed")
    subject: str
    time: str
    datacontenttype: Literal["application/json"]
    data: dict[str, Any]


class Status(BaseModel):
    """What ``/v1/status`` says: each model's deployment, its status and readiness."""

    deployments: dict[str, Any]


# ---- the routes ---------------------------------------------------------------------------

_AFTER = Param(
    name="after",
    where="query",
    schema={"type": "integer", "minimum": 0, "maximum": 2**62},
    description="Only what came after this sequence number.",
)
_SHARD_KEY = Param(
    name="X-Loom-Shard-Key",
    where="header",
    schema={"type": "string"},
    description="The key a model sharded by header is placed by.",
)
_INFERENCE_ERRORS = (400, 413, 503, 504)

OPERATIONS: dict[str, Operation] = {
    "completions": Operation(
        summary="Complete a prompt (OpenAI); stream: true answers SSE.",
        tag="openai",
        body=gen_api.CompletionRequest,
        answer=CompletionResponse,
        streams=True,
        errors=(*_INFERENCE_ERRORS, 404),
        params=(_SHARD_KEY,),
    ),
    "chat_completions": Operation(
        summary="Answer a chat (OpenAI); stream: true answers SSE.",
        tag="openai",
        body=gen_api.ChatCompletionRequest,
        answer=ChatCompletionResponse,
        streams=True,
        errors=(*_INFERENCE_ERRORS, 404),
        params=(_SHARD_KEY,),
    ),
    "embeddings": Operation(
        summary="Embed texts (OpenAI).",
        tag="openai",
        body=oai.EmbeddingsRequest,
        answer=oai.EmbeddingsResponse,
        errors=(*_INFERENCE_ERRORS, 404),
        params=(_SHARD_KEY,),
    ),
    "models": Operation(summary="The served models (OpenAI).", tag="openai", answer=oai.ModelList),
    "v2_metadata": Operation(summary="Server metadata (v2).", tag="v2", answer=v2.ServerMetadata),
    "v2_model": Operation(
        summary="A model's tensors (v2).", tag="v2", answer=v2.ModelMetadata, errors=(503,)
    ),
    "v2_ready": Operation(
        summary="Whether a model is ready (v2): 200, or 503 with the same body.",
        tag="v2",
        answer=v2.ModelReady,
        also=(503,),
    ),
    "v2_infer": Operation(
        summary="Embed texts or classify rows (v2).",
        tag="v2",
        body=v2.InferRequest,
        answer=v2.InferResponse,
        binary=True,
        errors=_INFERENCE_ERRORS,
        params=(_SHARD_KEY,),
    ),
    "admin_promote": Operation(
        summary="Move the alias a served model follows to another version.",
        tag="admin",
        body=admin.PromoteRequest,
        answer=admin.PromoteResponse,
        errors=(400, 409, 413),
        auth="admin",
    ),
    "admin_shards": Operation(
        summary="The shard map of every sharded model.",
        tag="admin",
        answer=admin.ShardMapList,
        params=(Param(name="key", where="query", schema={"type": "string"}),),
        auth="admin",
    ),
    "admin_reshard": Operation(
        summary="Serve a sharded model with another shard count.",
        tag="admin",
        body=admin.ReshardRequest,
        answer=admin.ReshardResponse,
        status=202,
        errors=(400, 409, 413),
        auth="admin",
    ),
    "admin_targets": Operation(
        summary="Prometheus HTTP service discovery: the gateway and every monitoring sidecar.",
        tag="admin",
        answer=TargetGroups,
        auth="admin",
    ),
    "metrics": Operation(
        summary="Prometheus metrics.", tag="monitoring", media=PROMETHEUS, auth="none"
    ),
    "status": Operation(summary="What is deployed and ready.", tag="monitoring", answer=Status),
    "v2_live": Operation(
        summary="Liveness (v2).", tag="monitoring", answer=v2.ServerLive, auth="none"
    ),
    "v2_ready_all": Operation(
        summary="Readiness of every model (v2): 200, or 503 with the same body.",
        tag="monitoring",
        answer=v2.ServerReady,
        also=(503,),
        auth="none",
    ),
    "openapi": Operation(summary="This document.", tag="monitoring"),
    # the jobs router's (``training.api``), by function name
    "submit_job": Operation(
        summary="Submit a training job; a repeat under its Idempotency-Key or job_id is 200.",
        tag="jobs",
        body="JobSubmit",
        answer=Job,
        status=201,
        also=(200,),
        errors=(400, 409, 413, 422, 429),
        params=(
            Param(
                name="Idempotency-Key",
                where="header",
                schema={"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY_CHARS},
            ),
        ),
    ),
    "list_jobs": Operation(
        summary="Jobs, newest first.",
        tag="jobs",
        answer=JobList,
        errors=(400,),
        params=(Param(name="state", where="query", schema={"enum": [s.value for s in JobState]}),),
    ),
    "get_job": Operation(summary="One job.", tag="jobs", answer=Job),
    "cancel_job": Operation(summary="Cancel a job.", tag="jobs", answer=Job, errors=(409,)),
    "job_logs": Operation(
        summary="A job's log lines.",
        tag="jobs",
        answer=LogList,
        errors=(400,),
        params=(
            _AFTER,
            Param(
                name="limit",
                where="query",
                schema={"type": "integer", "minimum": 1, "maximum": MAX_LOG_LINES},
            ),
        ),
    ),
    "job_events": Operation(
        summary="A job's events: CloudEvents on SSE until the job is final.",
        tag="jobs",
        media=SSE,
        event=CloudEvent,
        errors=(400,),
        params=(
            _AFTER,
            Param(name="Last-Event-ID", where="header", schema={"type": "string"}),
        ),
    ),
}


# ---- the document -------------------------------------------------------------------------


def app_routes(routes: Iterable[object], prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(method, path template, route name) of every route, into included routers; HEAD and
    OPTIONS left out (Starlette answers them for every GET)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:  # FastAPI keeps an included router whole, with its prefix
            context = getattr(route, "include_context", None)
            yield from app_routes(included.routes, prefix + getattr(context, "prefix", ""))
            continue
        path, methods = getattr(route, "path", None), getattr(route, "methods", None)
        if path is None or not methods:
            continue
        for method in sorted(set(methods) - {"HEAD", "OPTIONS"}):
            yield method, prefix + path, str(getattr(route, "name", ""))


def undescribed(app: FastAPI) -> list[str]:
    """Routes of ``app`` with no entry in ``OPERATIONS`` (a test keeps this empty)."""
    return [f"{m} {p}" for m, p, name in app_routes(app.routes) if name not in OPERATIONS]


_PATH_PARAM = re.compile(r"{(\w+)(?::\w+)?}")
_REF_TEMPLATE = "#/components/schemas/{model}"
Names = dict[tuple[type[Any], JsonSchemaMode], str]


def openapi_document(app: FastAPI, *, keys_on: bool, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route of ``app`` (module docstring)."""
    names, schemas = _components()
    paths: dict[str, dict[str, Any]] = {}
    for method, path, name in app_routes(app.routes):
        template = _PATH_PARAM.sub(r"{\1}", path)  # Starlette's {name:path} -> {name}
        operation = OPERATIONS.get(name)
        described = (
            _operation(operation, template, names, keys_on=keys_on)
            if operation is not None
            else {"summary": f"{name} (undescribed)", "responses": {}}
        )
        slug = re.sub(r"[^A-Za-z0-9]+", "_", template).strip("_")
        described["operationId"] = f"{method.lower()}_{slug}"
        paths.setdefault(template, {})[method.lower()] = described
    components: dict[str, Any] = {"schemas": schemas}
    if keys_on:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Loom",
            "version": version,
            "description": "Loom's HTTP API: OpenAI-compatible and Open Inference Protocol v2 "
            "inference, training jobs, admin and monitoring. Errors under /v2 are "
            '{"error": "..."}; everywhere else OpenAI\'s {"error": {...}}.',
        },
        "paths": paths,
        "components": components,
    }


def _operation(op: Operation, path: str, names: Names, *, keys_on: bool) -> dict[str, Any]:
    error_ref = _ref("V2Error" if protocol_for_path(path) == "v2" else "OpenAIError")
    path_params = _PATH_PARAM.findall(path)
    parameters = [
        {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
        for p in path_params
    ]
    parameters += [
        {"name": p.name, "in": p.where, "required": False, "schema": p.schema}
        | ({"description": p.description} if p.description else {})
        for p in op.params
    ]
    responses: dict[str, Any] = {}
    for status in (op.status, *op.also):
        responses[str(status)] = _success(op, status, names)
    errors = set(op.errors)
    if op.body is not None:
        errors |= {400, 413}
    if path_params:
        errors.add(404)
    if keys_on and op.auth != "none":
        errors.add(401)
    if keys_on and op.auth == "admin":
        errors.add(403)
    for status in sorted(errors - {op.status, *op.also}):
        responses[str(status)] = {
            "description": _ERROR_MEANINGS.get(status, "refused"),
            "content": {JSON: {"schema": error_ref}},
        }
    responses["default"] = {
        "description": "any other error, in the same shape (405, 408, 431, 500, ...)",
        "content": {JSON: {"schema": error_ref}},
    }
    described: dict[str, Any] = {
        "summary": op.summary,
        "tags": [op.tag],
        "parameters": parameters,
        "responses": responses,
    }
    if op.body is not None:
        body = op.body if isinstance(op.body, str) else names[(op.body, "validation")]
        described["requestBody"] = {"required": True, "content": {JSON: {"schema": _ref(body)}}}
    if keys_on:
        described["security"] = [] if op.auth == "none" else [{"bearer": []}]
    return described


def _success(op: Operation, status: int, names: Names) -> dict[str, Any]:
    if op.media == PROMETHEUS:
        content: dict[str, Any] = {PROMETHEUS: {"schema": {"type": "string"}}}
    elif op.media == SSE:
        content = {SSE: {"schema": _sse_event(op, names)}}
    elif op.answer is not None:
        content = {JSON: {"schema": _ref(names[(op.answer, "serialization")])}}
    else:
        content = {JSON: {"schema": {"type": "object"}}}
    if op.streams:
        content[SSE] = {"schema": _sse_event(op, names)}
    if op.binary:
        content[BINARY] = {
            "schema": {
                "type": "string",
                "format": "binary",
                "description": "The answer's JSON (Inference-Header-Content-Length bytes), "
                "then the outputs asked for in binary, in order.",
            }
        }
    return {"description": op.summary if status == op.status else "also", "content": content}


def _sse_event(op: Operation, names: Names) -> dict[str, Any]:
    """One SSE event (OpenAPI 3.1 has ``schema`` describe each event): its ``data`` is the
    JSON of ``op.event``, or any text (a generation chunk's JSON, then ``[DONE]``)."""
    data: dict[str, Any] = {"type": "string"}
    if op.event is not None:
        data |= {
            "contentMediaType": JSON,
            "contentSchema": _ref(names[(op.event, "serialization")]),
        }
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": data, "event": {"type": "string"}, "id": {"type": "string"}},
    }


_ERROR_MEANINGS = {
    400: "malformed or invalid request",
    401: "missing or invalid API key",
    403: "an admin route without an admin key",
    404: "no such model, version, job or route",
    409: "conflict with the current state",
    413: "body, inputs or an input too large",
    422: "job spec refused; every field error listed",
    429: "a rate limit or the caller's job quota reached; Retry-After says when to retry",
    503: "overloaded or not ready; Retry-After says when to retry",
    504: "no answer within the request's deadline",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF_TEMPLATE.format(model=name)}


def _components() -> tuple[Names, dict[str, Any]]:
    """The name of every model's schema, and every schema: the models the operations name,
    both error shapes, and ``JobSubmit``: one of the registered trainers' specs, each with
    the optional ``job_id`` the jobs API takes beside it."""
    specs = TRAINERS.job_specs()
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (oai.OpenAIError, "serialization"),
        (v2.V2Error, "serialization"),
    ]
    for op in OPERATIONS.values():
        if isinstance(op.body, type):
            models.append((op.body, "validation"))
        for answer in (op.answer, op.event):
            if answer is not None:
                models.append((answer, "serialization"))
    models += [(spec, "validation") for spec in specs.values()]
    keys, top = models_json_schema(list(dict.fromkeys(models)), ref_template=_REF_TEMPLATE)
    names: Names = {key: value["$ref"].rsplit("/", 1)[1] for key, value in keys.items()}
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    job_id = {
        "type": "string",
        "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        "description": "Your id for the job (else one is made): a repeat is idempotent.",
    }
    choices = []
    for trainer, spec in specs.items():
        name = names[(spec, "validation")]
        submit = copy.deepcopy(schemas[name])
        submit["properties"] = {**submit.get("properties", {}), "job_id": job_id}
        submit["title"] = f"{name}Submit"
        schemas[f"{name}Submit"] = submit
        choices.append((trainer, f"{name}Submit"))
    schemas["JobSubmit"] = {
        "oneOf": [_ref(name) for _, name in choices],
        "discriminator": {
            "propertyName": "trainer",
            "mapping": {trainer: _REF_TEMPLATE.format(model=name) for trainer, name in choices},
        },
    }
    return names, schemas


def add_openapi_route(endpoints: Endpoints, app: FastAPI, gw: GatewayCore, version: str) -> None:
    """``GET /openapi.json`` over every route of ``app`` (add it last: it lists the app's
    routes when first asked, then keeps the document)."""
    built: dict[str, Any] = {}

    @endpoints.get(OPENAPI_PATH, "openapi")
    async def openapi(scope: Scope) -> Response:
        if not built:
            built.update(openapi_document(app, keys_on=gw.config.server.keys_on, version=version))
        return JSONResponse(built)
