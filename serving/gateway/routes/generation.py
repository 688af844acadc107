"""The gateway's generation routes: ``POST /v1/completions`` and ``POST /v1/chat/completions``.

Non-streaming requests make one call (``complete``) to a replica of the model's current
version. Streaming ones open a Ray Serve stream (``generate``) and wait for its first chunk
before answering, so a refusal (empty prompt, context exceeded, a full replica) is still a
proper 400/503 rather than an error inside a 200 stream. Then each chunk becomes SSE events.
When the client disconnects, Starlette cancels the response's iterator; its ``finally``
cancels the Ray stream, and the replica's generator cancels its sequences, freeing their slots.

The request's deadline (``server.request_timeout_s``) travels in the call: a non-streaming
answer must come within it (else 504, and the call is cancelled), a stream's first token too
(the replica cancels a generation with no token by then; the stream then ends with an error
event, or the request is a 504 if nothing was sent yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from ray.serve.handle import DeploymentResponseGenerator
from starlette.responses import Response, StreamingResponse

from serving.config import ModelConfig
from serving.gateway.body import parse_json, read_body, validate
from serving.gateway.core import GatewayCore, send_once_more_if_lost
from serving.gateway.endpoint import VERSION_HEADER, Endpoints, Scope
from serving.gateway.errors import JSON, ApiError, api_error, bad_request, wrong_route
from serving.gateway.limits import check_texts
from serving.gateway.protocols import openai_generation as gen_api
from serving.messages import DeadlineExceeded, GenerateCall, GenerateChunk

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def add_generation_routes(endpoints: Endpoints, gw: GatewayCore) -> None:
    """Mount the OpenAI generation routes."""

    @endpoints.post("/v1/completions", "completions", id_prefix="cmpl-")
    async def completions(scope: Scope) -> Response:
        request = scope.request
        data = parse_json(await read_body(request, gw.max_body_bytes))
        body = validate(gen_api.CompletionRequest, data)
        refusal = body.scoring_refusal()
        if refusal is not None:
            raise bad_request(refusal, param="max_tokens")
        model = _generate_model(gw, body.model, "/v1/completions")
        scope.model = model.name
        check_texts(body.prompts(), model.limits, field="prompt", plural="prompts", name_one=True)
        call = body.call(gw.envelope(scope.request_id, request.headers, scope.arrived_s))
        return await _answer(gw, model, call, stream=body.stream, chat=False,
                             include_usage=body.include_usage)  # fmt: skip

    @endpoints.post("/v1/chat/completions", "chat_completions", id_prefix="chatcmpl-")
    async def chat_completions(scope: Scope) -> Response:
        request = scope.request
        data = parse_json(await read_body(request, gw.max_body_bytes))
        body = validate(gen_api.ChatCompletionRequest, data)
        model = _generate_model(gw, body.model, "/v1/chat/completions")
        scope.model = model.name
        chars = sum(len(m.text()) for m in body.messages)
        if chars > model.limits.max_input_chars:
            raise ApiError(
                413,
                f"messages hold {chars} characters; the limit is {model.limits.max_input_chars}",
                code="input_too_long",
                param="messages",
            )
        call = body.call(gw.envelope(scope.request_id, request.headers, scope.arrived_s))
        return await _answer(gw, model, call, stream=body.stream, chat=True,
                             include_usage=body.include_usage)  # fmt: skip


def _generate_model(gw: GatewayCore, name: str, route: str) -> ModelConfig:
    model = gw.model(name)
    if model.task != "generate" or not isinstance(model, ModelConfig):
        raise wrong_route(model.name, model.task, route)
    return model


async def _answer(
    gw: GatewayCore,
    model: ModelConfig,
    call: GenerateCall,
    *,
    stream: bool,
    chat: bool,
    include_usage: bool,
) -> Response:
    """One completion: the whole answer, or an SSE stream once the replica accepted it."""
    route = gw.route(model.name, call.envelope)
    # counted in flight until the answer ends: the rollout reconciler deletes an old version
    # only once no gateway has a request left on it
    in_flight = contextlib.ExitStack()
    in_flight.enter_context(gw.routes.tracking(route.app_name))
    remaining_s = call.envelope.remaining_s()
    if not stream:
        try:
            whole: GenerateChunk = await asyncio.wait_for(
                send_once_more_if_lost(
                    model.name,
                    [call.envelope],
                    lambda: route.handle.complete.remote(call),
                    retry=call.repeatable,
                ),
                remaining_s,
            )
        except TimeoutError:
            raise DeadlineExceeded(model.name, call.request_id) from None
        finally:
            in_flight.close()
        tokens = sum(d.completion_tokens for d in whole.deltas)
        build = gen_api.chat_response if chat else gen_api.completion_response
        content = build(
            id=call.request_id,
            created_s=int(time.time()),
            model=model.name,
            call=call,
            choices=whole.deltas,
            usage=gen_api.usage(whole.prompt_tokens, tokens, call.n),
        )
        return Response(content, media_type=JSON, headers={VERSION_HEADER: whole.version})

    started: list[DeploymentResponseGenerator] = []

    async def start() -> GenerateChunk:
        """Open the stream and take its first chunk: until then nothing has reached the
        client, so a stream whose replica is lost here may start again elsewhere."""
        started.append(route.handle.options(stream=True).generate.remote(call))
        chunk: GenerateChunk = await started[-1].__anext__()
        return chunk

    try:
        first = await asyncio.wait_for(
            send_once_more_if_lost(model.name, [call.envelope], start), remaining_s
        )
    except BaseException as exc:
        for opened in started:
            opened.cancel()
        in_flight.close()
        if isinstance(exc, TimeoutError):
            raise DeadlineExceeded(model.name, call.request_id) from None
        raise
    generator = started[-1]
    writer = gen_api.ChunkWriter(
        chat=chat,
        id=call.request_id,
        created_s=int(time.time()),
        model=model.name,
        logprobs=call.logprobs is not None,
    )
    events = _events(generator, first, writer, call, in_flight, include_usage=include_usage)
    headers = {**SSE_HEADERS, VERSION_HEADER: first.version}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


async def _events(
    generator: DeploymentResponseGenerator,
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
        async for chunk in generator:
            for d in chunk.deltas:
                completion[d.index] = d.completion_tokens
            data = writer.deltas(chunk.deltas)
            if data:
                yield data
        if include_usage:
            yield writer.usage(gen_api.usage(first.prompt_tokens, sum(completion.values()), call.n))
        yield gen_api.SSE_DONE
    except Exception as exc:  # the status line is sent: say it in the stream, then end it
        error = api_error(exc)
        if error is None:
            logger.exception("request %s: the stream failed", call.request_id)
            yield writer.error(f"generation failed ({type(exc).__name__})", "generation_failed")
        else:
            yield writer.error(error.message, error.code or "generation_failed")
        yield gen_api.SSE_DONE
    finally:
        generator.cancel()  # a no-op once finished; on a disconnect it frees the slots
        in_flight.close()
