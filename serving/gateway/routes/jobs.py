"""The jobs routes: ``training.api``'s ``/v1/jobs`` router, mounted behind the gateway's keys,
and the service it runs on: the store, the cluster's capacity, the scheduler nudge.

``training.api`` provides the routes (it answers its own errors, in OpenAI's shape); this
module gives them what only a Ray process knows: the cluster's CPUs and GPUs
(``ray.cluster_resources``), and the named scheduler actor to wake after a submit or cancel.

    service = build_jobs_service(JobsSettings(db_url=env.db_url, dataset_roots=[...]),
                                 max_body_bytes=config.server.max_body_bytes)
    add_jobs_routes(app, core)       # when core.jobs is that service
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import ray
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from models.refs import ModelRef
from serving.config import LoomConfig, ModelConfig
from serving.gateway.browser_guard import BrowserGuard
from serving.gateway.core import GatewayCore
from serving.gateway.endpoint import ANONYMOUS
from serving.gateway.errors import ApiError
from serving.gateway.scopes import JOBS_ROUTE
from training.api import JobsService, audited_route, build_jobs_router
from training.callers import Caller
from training.db import create_db_engine, create_tables
from training.jobs import JobStore
from training.scheduler import NAMESPACE, SCHEDULER_NAME
from training.spec import ClusterCapacity
from training.webhook_addresses import WebhookAddressPolicy, parse_networks


class JobsSettings(BaseModel):
    """What the gateway deployment is told about the job store (``Gateway(jobs=...)``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    db_url: str = Field(description="The job store's SQLAlchemy URL (``LoomEnv.db_url``).")
    dataset_roots: list[str] = Field(
        default_factory=list, description="Folders a job's dataset may lie under."
    )
    webhook_allowed_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs a webhook may reach though not public "
        "(training.webhook_allowed_networks).",
    )
    training_cpus: float | None = Field(
        None, description="CPUs set aside for training (a job's bound); None: the cluster's."
    )
    training_gpus: float | None = Field(
        None, description="GPUs set aside for training (a job's bound); None: the cluster's."
    )


def ray_capacity(
    training_cpus: float | None = None, training_gpus: float | None = None
) -> ClusterCapacity:
    """What one job may reserve: the CPUs and GPUs set aside for training, never more than
    the cluster holds now (whose total counts the serving replicas' reservations too)."""
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    return ClusterCapacity(
        total_cpus=cpus if training_cpus is None else min(cpus, training_cpus),
        total_gpus=gpus if training_gpus is None else min(gpus, training_gpus),
    )


def wake_scheduler() -> None:
    """Nudge the scheduler actor, if one runs; fire and forget (it polls the store anyway).

    Looked up on every call: the scheduler may start after the gateway, or be restarted.
    """
    try:
        scheduler = ray.get_actor(SCHEDULER_NAME, namespace=NAMESPACE)
    except ValueError:  # not started (yet): nothing to wake
        return
    scheduler.wake.remote()


def build_jobs_service(settings: JobsSettings, *, max_body_bytes: int) -> JobsService:
    """Open the store (creating its tables if new) and wire Ray's capacity and wake. Blocks."""
    engine = create_db_engine(settings.db_url)  # a SQLite file's folder is made if missing
    create_tables(engine)
    return JobsService(
        store=JobStore(engine),
        capacity=functools.partial(ray_capacity, settings.training_cpus, settings.training_gpus),
        dataset_roots=tuple(Path(root) for root in settings.dataset_roots),
        wake=wake_scheduler,
        max_body_bytes=max_body_bytes,
        webhook_policy=WebhookAddressPolicy(
            allowed_networks=parse_networks(settings.webhook_allowed_networks)
        ),
    )


JSON_BODY_ROUTES = frozenset({("POST", "/v1/jobs")})
"""The jobs routes that read a JSON body (a cancel takes none)."""


def add_jobs_routes(app: FastAPI, gw: GatewayCore) -> None:
    """Mount ``/v1/jobs`` when the gateway has a jobs service. Its router answers its own
    errors; ``authorize``'s ``ApiError`` reaches the app's error handler. Every jobs route
    passes ``browser_guard``'s rules first, as the gateway's own routes do."""
    if gw.jobs is None:
        return
    guard = BrowserGuard.of(gw.config.server)

    served = served_store_names(gw.config)
    audit = gw.audit

    def authorize(request: Request) -> Caller:
        json_body = (request.method, request.url.path.rstrip("/")) in JSON_BODY_ROUTES
        caller = None
        try:
            guard.check(request, json_body=json_body)
            caller = gw.authenticate(request)
            gw.permit(caller, JOBS_ROUTE)
        except ApiError as refused:  # a refused submit or cancel is audited as an allowed one
            route = audited_route(request.method, request.url.path)
            if route is not None and audit is not None:
                principal = ANONYMOUS if caller is None else caller.principal
                target = str(request.path_params.get("job_id", ""))
                audit.record(principal, route, target, str(refused.status))
            raise
        return caller

    def record(caller: Caller, route: str, target: str, status: int, details: dict) -> None:
        if audit is not None:
            audit.record(caller.principal, route, target, str(status), **details)

    training = gw.config.training
    service = dataclasses.replace(
        gw.jobs,
        is_served=served.__contains__,
        audit=record,
        max_active_jobs=training.max_active_jobs,
        max_priority=training.max_priority,
    )
    app.include_router(build_jobs_router(service, authorize=authorize))


def served_store_names(config: LoomConfig) -> frozenset[str]:
    """The names a job may register under only with the ``models`` scope: every name clients
    call, and the store model each served entry loads (a bare ``NAME`` source follows the
    latest version, so a new version there is served at once)."""
    refs = [m.source for m in config.models if isinstance(m, ModelConfig)]
    refs += [member.ref for member in config.pool_members().values()]
    return frozenset((*config.served_names(), *(ModelRef.parse(ref).name for ref in refs)))
