"""The gateway's generation routes: ``POST /v1/completions`` and ``POST /v1/chat/completions``.

Non-streaming requests make one call (``complete``) to a replica of the model's current
version. Streaming ones open a Ray Serve stream (``generate``) and wait for its first chunk
before answering, so a refusal (empty prompt, context exceeded, a full replica) is still a
proper 400/503 rather than an error inside a 200 stream. Then each chunk becomes SSE events.
When the client disconnects, Starlette cancels the response's iterator; its ``finally``
cancels the Ray stream, and the replica's generator cancels its sequences, freeing their slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from ray.serve.handle import DeploymentResponseGenerator
from starlette.responses import Response, StreamingResponse

from serving.body import parse_json, read_body, validate
from serving.config import ModelConfig
from serving.errors import ApiError, Overloaded, bad_request, overloaded
from serving.generation import GenerateCall, GenerateChunk, GenerationRefused
from serving.protocols import openai_generation as gen_api
from serving.sharding import SHARD_KEY_HEADER

if TYPE_CHECKING:
    from serving.gateway import GatewayCore

JSON = "application/json"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
VERSION_HEADER = "x-loom-model-version"  # the model version that generated the answer


def refused(exc: GenerationRefused) -> ApiError:
    return bad_request(exc.message, param=exc.param)


def add_generation_routes(app: FastAPI, gw: GatewayCore) -> None:
    """Mount the OpenAI generation routes on the gateway's app (``gw``: a GatewayCore)."""

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        async def handle(labels: dict[str, str]) -> Response:
            data = parse_json(await read_body(request, gw.max_body_bytes))
            body = validate(gen_api.CompletionRequest, data)
            model = _generate_model(gw, body.model, "/v1/completions")
            labels["model"] = model.name
            _check_prompts(body.prompts(), model)
            call = body.call(_request_id(request, "cmpl-"))
            key = request.headers.get(SHARD_KEY_HEADER) or call.request_id
            return await _answer(gw, model, call, body, chat=False, shard_key=key)

        return await gw.measured(request, "completions", handle)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        async def handle(labels: dict[str, str]) -> Response:
            data = parse_json(await read_body(request, gw.max_body_bytes))
            body = validate(gen_api.ChatCompletionRequest, data)
            model = _generate_model(gw, body.model, "/v1/chat/completions")
            labels["model"] = model.name
            chars = sum(len(m.text()) for m in body.messages)
            if chars > model.limits.max_input_chars:
                raise ApiError(
                    413,
                    f"messages hold {chars} characters; the limit is "
                    f"{model.limits.max_input_chars}",
                    code="input_too_long",
                    param="messages",
                )
            call = body.call(_request_id(request, "chatcmpl-"))
            key = request.headers.get(SHARD_KEY_HEADER) or call.request_id
            return await _answer(gw, model, call, body, chat=True, shard_key=key)

        return await gw.measured(request, "chat_completions", handle)


def _generate_model(gw: GatewayCore, name: str, route: str) -> ModelConfig:
    from serving.gateway import wrong_route

    model = gw.model(name)
    if model.task != "generate":
        raise wrong_route(model, route)
    return model


def _check_prompts(prompts: tuple[str, ...], model: ModelConfig) -> None:
    """An empty prompt -> 400; too many or too long -> 413."""
    limits = model.limits
    if len(prompts) > limits.max_inputs:
        raise ApiError(
            413,
            f"{len(prompts)} prompts exceed the limit of {limits.max_inputs} per request",
            code="too_many_inputs",
            param="prompt",
        )
    for i, prompt in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if not prompt:
            raise bad_request(f"{where} is an empty string", param="prompt")
        if len(prompt) > limits.max_input_chars:
            raise ApiError(
                413,
                f"{where} has {len(prompt)} characters; the limit is {limits.max_input_chars}",
                code="input_too_long",
                param="prompt",
            )


def _request_id(request: Request, prefix: str) -> str:
    given = request.headers.get("x-request-id")
    return given if given and len(given) <= 128 else prefix + uuid.uuid4().hex


async def _answer(
    gw: GatewayCore,
    model: ModelConfig,
    call: GenerateCall,
    body,
    *,
    chat: bool,
    shard_key: str = "",
) -> Response:
    """``shard_key``: what a model sharded by header is placed by (a session's key keeps its
    requests on one shard)."""
    timeout_s = gw.config.server.request_timeout_s
    route = gw.route(model.name, shard_key=shard_key)
    # counted in flight until the answer ends: the rollout reconciler deletes an old version
    # only once no gateway has a request left on it
    in_flight = contextlib.ExitStack()
    in_flight.enter_context(gw.routes.tracking(route.app_name))
    if not body.stream:
        try:
            whole: GenerateChunk = await asyncio.wait_for(
                route.handle.complete.remote(call), timeout_s
            )
        except GenerationRefused as exc:
            raise refused(exc) from None
        except Overloaded as exc:
            raise overloaded(exc) from None
        except TimeoutError:
            raise _timeout(model) from None
        finally:
            in_flight.close()
        tokens = sum(d.completion_tokens for d in whole.deltas)
        build = gen_api.chat_response if chat else gen_api.completion_response
        content = build(
            id=call.request_id,
            created_s=int(time.time()),
            model=model.name,
            choices=whole.deltas,
            usage=gen_api.usage(whole.prompt_tokens, tokens, call.n),
        )
        return Response(content, media_type=JSON, headers={VERSION_HEADER: whole.version})

    stream: DeploymentResponseGenerator = route.handle.options(stream=True).generate.remote(call)
    try:
        first: GenerateChunk = await asyncio.wait_for(stream.__anext__(), timeout_s)
    except BaseException as exc:
        stream.cancel()
        in_flight.close()
        if isinstance(exc, GenerationRefused):
            raise refused(exc) from None
        if isinstance(exc, Overloaded):
            raise overloaded(exc) from None
        if isinstance(exc, TimeoutError):
            raise _timeout(model) from None
        raise
    writer = gen_api.ChunkWriter(
        chat=chat, id=call.request_id, created_s=int(time.time()), model=model.name
    )
    events = _events(stream, first, writer, call, in_flight, include_usage=body.include_usage)
    headers = {**SSE_HEADERS, VERSION_HEADER: first.version}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


async def _events(
    stream: DeploymentResponseGenerator,
    first: GenerateChunk,
    writer: gen_api.ChunkWriter,
    call: GenerateCall,
    in_flight: contextlib.ExitStack,
    *,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    completion: dict[int, int] = {}
    try:
        yield writer.roles(call.choices)
        async for chunk in stream:
            for d in chunk.deltas:
                completion[d.index] = d.completion_tokens
            data = writer.deltas(chunk.deltas)
            if data:
                yield data
        if include_usage:
            yield writer.usage(gen_api.usage(first.prompt_tokens, sum(completion.values()), call.n))
        yield gen_api.SSE_DONE
    except Exception as exc:  # the status line is sent: say it in the stream, then end it
        yield writer.error(f"generation failed ({type(exc).__name__})", "generation_failed")
        yield gen_api.SSE_DONE
    finally:
        stream.cancel()  # a no-op once finished; on a disconnect it frees the slots
        in_flight.close()


def _timeout(model: ModelConfig) -> ApiError:
    return ApiError(504, f"model {model.name} did not answer within the deadline", code="timeout")
