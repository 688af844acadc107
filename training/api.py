"""The jobs API: the HTTP routes of training jobs, as a router the gateway mounts.

``training`` provides the router and knows nothing of ``serving``: the gateway passes its own
``authorize`` (which raises the gateway's error type, rendered by the gateway's app) and a
``JobsService`` with the store and what the cluster offers.

    app.include_router(build_jobs_router(service, authorize=authorize))  # -> a Caller

Routes (errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``):

    POST /v1/jobs                  201 new job | 200 idempotent repeat | 400 bad JSON
                                   | 409 job_conflict | 413 too large | 422 invalid_job_spec
                                   | 429 job_quota_exceeded (max_active_jobs; Retry-After)
    GET  /v1/jobs?state=queued&limit=100&cursor=C
                                   200 {"object": "list", "data": [job, ...], "next_cursor"}
                                   | 400 bad state, limit or cursor (``training.pagination``)
    GET  /v1/jobs/{id}             200 job | 404 job_not_found
    POST /v1/jobs/{id}/cancel      200 job | 404 | 409 job_conflict (already final)
    GET  /v1/jobs/{id}/logs?after=N&limit=M   200 {"object": "list", "data": [line, ...]}
    GET  /v1/jobs/{id}/events      200 text/event-stream of CloudEvents | 404
    any route                      503 store_unavailable (Retry-After) while the database is
                                   unreachable

A 422 adds ``"fields": [{"field": "hyperparameters.learning_rate", "message": ...}, ...]``.

Ownership: ``authorize`` returns the ``Caller``; a job belongs to the principal that submitted
it. List, get, cancel, logs and events show a caller its own jobs only (another's is a 404, as
if it did not exist), unless it holds ``admin``. An ``Idempotency-Key`` is the caller's own.
A job named after a served model (``JobsService.is_served``) or with ``promote: true`` needs the
``models`` scope (403 ``insufficient_scope``). ``spec.webhook_url`` is shown to the owner only.
Every store call runs in a worker thread (``asyncio.to_thread``): the store blocks.

No input is a 500: a body is parsed by orjson (nesting deeper than 1024, numbers beyond a
double, lone surrogates and invalid UTF-8 are 400s, where the stdlib parser raised
``RecursionError`` or let them through); a path id that no job can have is a 404 before the
store is asked (a NUL, which Postgres refuses in a string, included); headers and query
numbers are parsed with bounds.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, Request
from sqlalchemy.exc import OperationalError
from starlette.responses import JSONResponse, Response, StreamingResponse

from training.callers import LOCAL_CALLER, Caller
from training.events import SSE_KEEP_ALIVE, cloud_event, sse_message
from training.jobs import (
    FINAL_STATES,
    Job,
    JobConflict,
    JobId,
    JobNotFound,
    JobQuotaExceeded,
    JobState,
    JobStore,
    LogLine,
)
from training.pagination import BadPageQuery, page_answer, page_request
from training.spec import ClusterCapacity, FieldError, JobSpecInvalid, validate_job_spec
from training.webhook_addresses import WebhookAddressPolicy, webhook_url_refusal
from training.webhook_signing import new_webhook_secret

logger = logging.getLogger(__name__)

JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A client-chosen job id: it is a URL path segment and the store's 64-character key. Always
``fullmatch``ed: ``match`` with ``$`` let a trailing newline through."""
MAX_IDEMPOTENCY_KEY_CHARS = 200
MAX_LOG_LINES = 10_000
MAX_EVENT_SEQ = 2**62
STORE_RETRY_AFTER_S = 1
SUBMIT_AUDIT = "jobs.submit"
CANCEL_AUDIT = "jobs.cancel"
"""The audit log's route names of the two state-changing jobs calls."""
QUOTA_RETRY_AFTER_S = 30
"""A caller at its job quota waits for one of its jobs to end: seconds to minutes."""


@dataclass(frozen=True, kw_only=True)
class JobsService:
    """What the jobs routes need from the process that mounts them."""

    store: JobStore
    """The job store (SQLite or Postgres)."""
    capacity: Callable[[], ClusterCapacity]
    """The cluster's CPUs and GPUs now; called once per submit (may block: run in a thread)."""
    dataset_roots: tuple[Path, ...]
    """Folders a job's dataset may lie under."""
    wake: Callable[[], None] = lambda: None
    """Nudges the scheduler after a submit or cancel; best-effort (it polls the store anyway)."""
    max_body_bytes: int = 1 << 20
    """A submit body larger than this is refused with 413."""
    events_poll_interval_s: float = 0.5
    """How often the SSE stream reads the store for new events."""
    keep_alive_interval_s: float = 15.0
    """Idle seconds before the SSE stream sends a comment, so proxies keep it open."""
    webhook_policy: WebhookAddressPolicy = WebhookAddressPolicy()
    """Where a job's ``webhook_url`` may point (checked at submit; 422 otherwise)."""
    audit: Callable[[Caller, str, str, int, dict[str, Any]], None] | None = None
    """Takes a line per submit and cancel: (caller, route, target job id, status, details such
    as the job's name and whether it promotes); the gateway's audit log."""
    is_served: Callable[[str], bool] = lambda name: False
    """Whether a store name is served (a served model's name or its source's store name): a
    job may register under it only with the ``models`` scope."""
    max_active_jobs: int | None = None
    """Jobs one caller may have queued or running at once (429 past it); None: no bound.
    Admin keys (and so the keyless local mode) are not bound."""
    max_priority: int = 100
    """The highest ``priority`` a caller without ``admin`` may ask (422 on the field past it)."""


class JobsApiError(Exception):
    """An answer other than success; rendered by ``error_response``."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        *,
        param: str | None = None,
        fields: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.fields = fields
        self.headers = headers


_ERROR_TYPES = {
    400: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",  # as the gateway's own 429s
    503: "overloaded_error",  # the type the gateway gives every 503 (docs/api.md#errors)
}


def error_response(error: JobsApiError) -> JSONResponse:
    """The OpenAI error shape, plus ``fields`` for a 422."""
    body: dict[str, Any] = {
        "message": error.message,
        "type": _ERROR_TYPES.get(error.status, "api_error"),
        "param": error.param,
        "code": error.code,
    }
    if error.fields is not None:
        body["fields"] = [{"field": f.field, "message": f.message} for f in error.fields]
    return JSONResponse({"error": body}, status_code=error.status, headers=error.headers)


def job_json(job: Job, caller: Caller | None = None) -> dict[str, Any]:
    """A job as the API shows ``caller`` (default: its owner); times are float seconds since
    the epoch. Anyone but the owner (an admin) sees ``spec.webhook_url`` as null."""
    spec = job.spec.model_dump(mode="json")
    if caller is not None and caller.principal != job.owner and spec.get("webhook_url"):
        spec["webhook_url"] = None
    return {
        "id": job.id.value,
        "name": job.name,
        "trainer": job.spec.trainer,
        "state": job.state.value,
        "stage": job.stage,
        "progress": job.progress,
        "metrics": job.metrics,
        "error": job.error,
        "priority": job.priority,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "owner": job.owner,
        "spec": spec,
    }


def log_line_json(line: LogLine) -> dict[str, Any]:
    return {"seq": line.seq, "time": line.time, "stage": line.stage, "message": line.message}


# --- reading a request --------------------------------------------------------------------


async def read_json_object(request: Request, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object: 413 past ``max_bytes`` (stopping reading there), 400 when
    it is not UTF-8 JSON or not an object.

    orjson, not the stdlib: it refuses nesting deeper than 1024 (``json.loads`` raised
    ``RecursionError``), a number beyond a double (``1e999``), ``NaN``, and lone surrogates
    (``"\\ud800"``, which ``json.loads`` let through to fail later)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise JobsApiError(400, "Content-Length is not a number", "invalid_request")
        if int(declared) > max_bytes:
            raise _too_large(int(declared), max_bytes)
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise _too_large(received, max_bytes)
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        message = f"malformed JSON body: not valid UTF-8 (byte {exc.start})"
        raise JobsApiError(400, message, "invalid_json") from None
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise JobsApiError(400, f"malformed JSON body: {exc}", "invalid_json") from None
    if not isinstance(data, dict):
        raise JobsApiError(400, "the body must be a JSON object (a job spec)", "invalid_json")
    return data


def _too_large(size: int, max_bytes: int) -> JobsApiError:
    message = f"request body of {size} bytes exceeds the limit of {max_bytes} bytes"
    return JobsApiError(413, message, "body_too_large")


def int_query(request: Request, name: str, default: int, *, low: int, high: int) -> int:
    """Query parameter ``name`` as an int in [low, high]; 400 otherwise."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        message = f"{name} must be an integer from {low} to {high}, got {raw!r}"
        raise JobsApiError(400, message, "invalid_query", param=name)
    return value


def event_seq_after(request: Request) -> int:
    """Where an event stream starts: ``Last-Event-ID`` (a reconnecting EventSource) when it
    is a seq, else ``?after=`` (the first request; an integer 0..2**62, else 400)."""
    # ?after= is checked even when the header wins: a bad one is a 400 either way
    after = int_query(request, "after", 0, low=0, high=MAX_EVENT_SEQ)
    resume = request.headers.get("last-event-id", "").strip()
    # ASCII digits only ('²' is a digit to str.isdigit, and int() refuses it); past 2**62
    # is past every event (int() of thousands of digits raises, so it is never called)
    if resume.isascii() and resume.isdigit():
        return int(resume) if len(resume) <= 18 else MAX_EVENT_SEQ
    return after


def submit_names(body: dict[str, Any], request: Request) -> tuple[str | None, str | None]:
    """(client job id, idempotency key) from the body's ``job_id`` and the ``Idempotency-Key``
    header; ``job_id`` is removed from ``body`` (it is not a spec field)."""
    job_id = body.pop("job_id", None)
    if job_id is not None and not (isinstance(job_id, str) and JOB_ID_PATTERN.fullmatch(job_id)):
        message = "job_id must be 1-64 letters, digits, '.', '_' or '-', starting alphanumeric"
        raise JobsApiError(422, message, "invalid_job_spec", fields=[FieldError("job_id", message)])
    key = request.headers.get("idempotency-key")
    if key is not None and not (1 <= len(key) <= MAX_IDEMPOTENCY_KEY_CHARS and key.isprintable()):
        message = f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_CHARS} printable characters"
        raise JobsApiError(400, message, "invalid_idempotency_key", param="Idempotency-Key")
    return job_id, key


def job_id_from_path(raw: str) -> JobId:
    """The path's job id; 404 without asking the store when no job can have it (every id is
    a client's ``JOB_ID_PATTERN`` or ours, ``job-<hex>``, which matches it too)."""
    if not JOB_ID_PATTERN.fullmatch(raw):
        raise JobNotFound(raw)
    return JobId(raw)


# --- the router ---------------------------------------------------------------------------


def build_jobs_router(
    service: JobsService, *, authorize: Callable[[Request], Caller | None]
) -> APIRouter:
    """The ``/v1/jobs`` routes over ``service`` (module docstring). ``authorize(request)`` runs
    first in every route and names the caller (None: ``LOCAL_CALLER``, every scope); whatever
    it raises propagates to the app's own handlers."""
    router = APIRouter()
    store = service.store

    async def answer(
        request: Request,
        handle: Callable[[Caller], Awaitable[Response]],
        *,
        audited: str | None = None,
    ) -> Response:
        """``handle``'s answer; with ``audited`` (a state-changing route), an audit line."""
        caller = authorize(request) or LOCAL_CALLER
        response = await respond(request, handle, caller)
        if audited is not None and service.audit is not None:
            target, details = audit_target(request, response)
            service.audit(caller, audited, target, response.status_code, details)
        return response

    async def respond(
        request: Request, handle: Callable[[Caller], Awaitable[Response]], caller: Caller
    ) -> Response:
        # an APIRouter cannot register exception handlers, so each route answers its own
        try:
            return await handle(caller)
        except JobsApiError as exc:
            return error_response(exc)
        except JobNotFound as exc:
            return error_response(
                JobsApiError(404, f"job '{exc}' does not exist", "job_not_found", param="id")
            )
        except JobConflict as exc:
            return error_response(JobsApiError(409, str(exc), "job_conflict"))
        except JobQuotaExceeded as exc:
            headers = {"Retry-After": str(QUOTA_RETRY_AFTER_S)}
            return error_response(
                JobsApiError(429, str(exc), "job_quota_exceeded", headers=headers)
            )
        except OperationalError as exc:  # the database is away (restarting, locked, unreachable)
            logger.warning(
                "%s %s: the job store is unavailable (%s)",
                request.method,
                request.url.path,
                exc.orig if exc.orig is not None else exc,
            )
            message = "the job store is unavailable; try again shortly"
            headers = {"Retry-After": str(STORE_RETRY_AFTER_S)}
            return error_response(JobsApiError(503, message, "store_unavailable", headers=headers))

    async def wake() -> None:
        try:
            await asyncio.to_thread(service.wake)
        except Exception as exc:  # best-effort: the scheduler polls the store anyway
            logger.info("could not wake the scheduler (%s: %s)", type(exc).__name__, exc)

    @router.post("/v1/jobs")
    async def submit_job(request: Request) -> Response:
        async def handle(caller: Caller) -> Response:
            body = await read_json_object(request, service.max_body_bytes)
            job_id, key = submit_names(body, request)
            capacity = await asyncio.to_thread(service.capacity)
            try:
                spec = await asyncio.to_thread(
                    validate_job_spec,
                    body,
                    capacity=capacity,
                    allowed_dataset_roots=service.dataset_roots,
                )
            except JobSpecInvalid as exc:
                raise JobsApiError(
                    422, f"invalid job spec: {exc}", "invalid_job_spec", fields=exc.errors
                ) from None
            check_model_rights(caller, spec.name, promote=spec.promote, served=service.is_served)
            check_priority(caller, spec.priority, service.max_priority)
            secret = await _vet_webhook(spec.webhook_url, service.webhook_policy)
            if job_id is None:
                # our own id, so a repeat under the key shows as a job with another id
                job_id, repeat_possible = f"job-{uuid.uuid4().hex}", False
            else:
                repeat_possible = True
            existed = repeat_possible and await asyncio.to_thread(_exists, store, job_id)
            job = await asyncio.to_thread(
                functools.partial(
                    store.submit,
                    spec,
                    job_id=job_id,
                    idempotency_key=key,
                    webhook_secret=secret,
                    owner=caller.principal,
                    max_active=None if caller.is_admin else service.max_active_jobs,
                )
            )
            created = job.id.value == job_id and not existed
            if created:
                await wake()
            answer = job_json(job, caller)
            if created and secret is not None:  # shown this once: no later read has it
                answer["webhook_secret"] = secret
            return JSONResponse(answer, status_code=201 if created else 200)

        return await answer(request, handle, audited=SUBMIT_AUDIT)

    @router.get("/v1/jobs")
    async def list_jobs(request: Request) -> Response:
        async def handle(caller: Caller) -> Response:
            raw = request.query_params.get("state")
            try:
                state = JobState(raw) if raw is not None else None
            except ValueError:
                known = ", ".join(s.value for s in JobState)
                message = f"unknown state {raw!r}; one of {known}"
                raise JobsApiError(400, message, "invalid_query", param="state") from None
            owner = None if caller.is_admin else caller.principal
            try:
                cursor, limit = page_request(request.query_params)
            except BadPageQuery as exc:
                raise JobsApiError(400, exc.message, "invalid_query", param=exc.param) from None
            after = None if cursor is None else (cursor.created_at, cursor.job_id)
            # one more than the page: whether a next page exists
            read = functools.partial(store.page, state, owner=owner, after=after, limit=limit + 1)
            jobs = await asyncio.to_thread(read)
            return JSONResponse(page_answer(jobs, limit, render=lambda j: job_json(j, caller)))

        return await answer(request, handle)

    @router.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, request: Request) -> Response:
        async def handle(caller: Caller) -> Response:
            job = await asyncio.to_thread(visible_job, store, job_id_from_path(job_id), caller)
            return JSONResponse(job_json(job, caller))

        return await answer(request, handle)

    @router.post("/v1/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str, request: Request) -> Response:
        async def handle(caller: Caller) -> Response:
            job_ref = job_id_from_path(job_id)
            await asyncio.to_thread(visible_job, store, job_ref, caller)  # 404 if not theirs
            job = await asyncio.to_thread(store.cancel, job_ref)
            await wake()  # the scheduler stops the job's run
            return JSONResponse(job_json(job, caller))

        return await answer(request, handle, audited=CANCEL_AUDIT)

    @router.get("/v1/jobs/{job_id}/logs")
    async def job_logs(job_id: str, request: Request) -> Response:
        async def handle(caller: Caller) -> Response:
            after = int_query(request, "after", 0, low=0, high=MAX_EVENT_SEQ)
            limit = int_query(request, "limit", 1000, low=1, high=MAX_LOG_LINES)
            job = job_id_from_path(job_id)
            await asyncio.to_thread(visible_job, store, job, caller)
            lines = await asyncio.to_thread(store.logs, job, after=after, limit=limit)
            return JSONResponse({"object": "list", "data": [log_line_json(x) for x in lines]})

        return await answer(request, handle)

    @router.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request) -> Response:
        async def handle(caller: Caller) -> Response:
            after = event_seq_after(request)
            job = job_id_from_path(job_id)
            await asyncio.to_thread(visible_job, store, job, caller)  # 404 before the stream
            stream = event_stream(service, job, after, request.is_disconnected)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(stream, media_type="text/event-stream", headers=headers)

        return await answer(request, handle)

    return router


async def _vet_webhook(url: object, policy: WebhookAddressPolicy) -> str | None:
    """A new signing secret for a job with a webhook the policy allows; None without one;
    422 on ``webhook_url`` for a URL whose host resolves to a refused address, or not at all."""
    if url is None:
        return None
    refusal = await asyncio.to_thread(webhook_url_refusal, str(url), policy)
    if refusal is not None:
        message = f"webhook_url: {refusal}"
        raise JobsApiError(
            422,
            f"invalid job spec: {message}",
            "invalid_job_spec",
            fields=[FieldError("webhook_url", refusal)],
        )
    return new_webhook_secret()


def audited_route(method: str, path: str) -> str | None:
    """The audit route name of a state-changing jobs call (submit, cancel), else None."""
    if method != "POST":
        return None
    path = path.rstrip("/")
    if path == "/v1/jobs":
        return SUBMIT_AUDIT
    return CANCEL_AUDIT if path.startswith("/v1/jobs/") and path.endswith("/cancel") else None


def audit_target(request: Request, response: Response) -> tuple[str, dict[str, Any]]:
    """What an audit line names: the path's job id, or the job a submit answered (its name and
    ``promote`` too: what it will register and whether it moves the serving alias)."""
    job_id = request.path_params.get("job_id")
    if job_id is not None:
        return str(job_id), {}
    try:
        body = orjson.loads(bytes(response.body))
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        return "", {}
    if not isinstance(body, dict) or "id" not in body:
        return "", {}
    return str(body["id"]), {"name": body.get("name"), "promote": body["spec"].get("promote")}


def visible_job(store: JobStore, job_id: JobId, caller: Caller) -> Job:
    """The job, if ``caller`` owns it or holds ``admin``; else ``JobNotFound`` (a 404, as for
    no job at all: ids of others' jobs do not leak)."""
    job = store.get(job_id)
    if not caller.is_admin and job.owner != caller.principal:
        raise JobNotFound(job_id.value)
    return job


def check_priority(caller: Caller, priority: int, ceiling: int) -> None:
    """422 on ``priority`` when a caller without ``admin`` asks more than ``ceiling``."""
    if priority > ceiling and not caller.is_admin:
        message = f"at most {ceiling} without the admin scope, got {priority}"
        raise JobsApiError(
            422,
            f"invalid job spec: priority: {message}",
            "invalid_job_spec",
            param="priority",
            fields=[FieldError("priority", message)],
        )


def check_model_rights(
    caller: Caller, name: str, *, promote: bool, served: Callable[[str], bool]
) -> None:
    """403 ``insufficient_scope`` (param ``models``) for a job that would promote, or register
    under a served name, from a key without the ``models`` scope."""
    if caller.has("models"):
        return
    if promote:
        reason = "promote: true moves the 'serving' alias"
    elif served(name):
        reason = f"name '{name}' is a served model's"
    else:
        return
    message = f"{reason}: this key ({caller.principal}) lacks the 'models' scope it needs"
    raise JobsApiError(403, message, "insufficient_scope", param="models")


def _exists(store: JobStore, job_id: str) -> bool:
    try:
        store.get(JobId(job_id))
    except JobNotFound:
        return False
    return True


async def event_stream(
    service: JobsService,
    job_id: JobId,
    after: int,
    is_disconnected: Callable[[], Awaitable[bool]],
) -> AsyncIterator[bytes]:
    """SSE frames of the job's events with ``seq > after``, polling the store; ends once the
    job is final and its last event was sent, or when the client has gone."""
    last_sent_s = time.monotonic()
    while not await is_disconnected():
        # the job before its events: a final state read here has its event written already
        # (one transaction), so the events read next include the last one
        job, events = await asyncio.to_thread(_job_and_events, service.store, job_id, after)
        for event in events:
            yield sse_message(cloud_event(job, event))
            after = event.seq
            last_sent_s = time.monotonic()
        if job.state in FINAL_STATES:
            return
        if time.monotonic() - last_sent_s >= service.keep_alive_interval_s:
            yield SSE_KEEP_ALIVE
            last_sent_s = time.monotonic()
        await asyncio.sleep(service.events_poll_interval_s)


def _job_and_events(store: JobStore, job_id: JobId, after: int) -> tuple[Job, list]:
    job = store.get(job_id)
    return job, store.events(job_id, after=after)
