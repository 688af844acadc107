"""The jobs router with its caller named by a test header, as the gateway names it from the
key: what the ownership and quota tests drive.

    with jobs_client(service, {"alice": Caller("alice", frozenset({"jobs"}))}) as http:
        http.post("/v1/jobs", json=spec, headers={"X-Caller": "alice"})
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from training.api import JobsService, build_jobs_router
from training.callers import Caller

CALLER_HEADER = "X-Caller"


@contextmanager
def jobs_client(service: JobsService, callers: Mapping[str, Caller]) -> Iterator[TestClient]:
    """A client of ``service``'s router; each request is the caller its ``X-Caller`` names."""

    def authorize(request: Request) -> Caller:
        return callers[request.headers[CALLER_HEADER]]

    app = FastAPI()
    app.include_router(build_jobs_router(service, authorize=authorize))
    with TestClient(app) as client:
        yield client
