"""Webhooks that cannot be turned against the network, end to end in one process: the jobs
API's submit check (422 on ``webhook_url``), the per-job secret shown once, a signed delivery a
receiver verifies, no redirect followed, and a name rebound to a private address between
submit and delivery refused at delivery.

The receiver is a real HTTP server on 127.0.0.1; the names resolve through a fake resolver,
so the network's DNS is never asked. The store runs on SQLite and PostgreSQL (``db_engine``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from test_webhook_addresses import FakeResolver

from training.api import JobsService, build_jobs_router
from training.jobs import JobId, JobStore
from training.spec import ClusterCapacity, parse_job_spec
from training.webhook_addresses import WebhookAddressPolicy, parse_networks
from training.webhook_signing import (
    SIGNATURE_HEADER,
    SignatureInvalid,
    signature_header,
    verify_signature,
)
from training.webhooks import WebhookDeliverer, post_json

LM = {"name": "tiny-lm", "trainer": "lm"}


@dataclass
class Delivery:
    method: str
    path: str
    host: str
    signature: str | None
    body: bytes


@dataclass
class Receiver:
    """A webhook endpoint on 127.0.0.1: keeps each request; ``/redirect`` answers 302."""

    port: int
    received: list[Delivery] = field(default_factory=list)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    received: list[Delivery] = []

    class Handler(BaseHTTPRequestHandler):
        def _keep(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            received.append(
                Delivery(
                    self.command,
                    self.path,
                    self.headers["Host"],
                    self.headers.get(SIGNATURE_HEADER),
                    self.rfile.read(length),
                )
            )
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/elsewhere")
            else:
                self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = _keep  # noqa: N815 - http.server's naming
        do_GET = _keep  # noqa: N815

        def log_message(self, *args: object) -> None:  # quiet
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Receiver(server.server_port, received)
    server.shutdown()
    server.server_close()
    thread.join()


def loopback_allowed(resolver: FakeResolver) -> WebhookAddressPolicy:
    return WebhookAddressPolicy(
        allowed_networks=parse_networks(["127.0.0.1/32"]), getaddrinfo=resolver
    )


def jobs_api(store: JobStore, policy: WebhookAddressPolicy, tmp_path: Path) -> TestClient:
    service = JobsService(
        store=store,
        capacity=lambda: ClusterCapacity(total_cpus=4, total_gpus=0),
        dataset_roots=(tmp_path,),
        webhook_policy=policy,
    )
    app = FastAPI()
    app.include_router(build_jobs_router(service, authorize=lambda request: None))
    return TestClient(app)


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:6379/",
        "http://[::ffff:10.0.0.1]/",
        "http://intranet.example.test/hook",  # a name that resolves to a private address
        "http://nowhere.example.test/hook",  # a name that does not resolve
    ],
)
def test_a_webhook_to_a_non_public_address_is_refused_at_submit_with_422(
    db_engine: Engine, tmp_path: Path, url: str
) -> None:
    store = JobStore(db_engine)
    resolver = FakeResolver({"intranet.example.test": ["10.0.0.1"]})
    with jobs_api(store, WebhookAddressPolicy(getaddrinfo=resolver), tmp_path) as client:
        response = client.post("/v1/jobs", json={**LM, "webhook_url": url})
    assert response.status_code == 422
    error = response.json()["error"]
    assert [f["field"] for f in error["fields"]] == ["webhook_url"]
    assert error["code"] == "invalid_job_spec"
    assert store.list() == []  # nothing queued


def test_the_submit_returns_the_webhook_secret_once_and_the_receiver_verifies_each_delivery(
    db_engine: Engine, tmp_path: Path, receiver: Receiver
) -> None:
    store = JobStore(db_engine)
    resolver = FakeResolver({"hooks.example.test": ["127.0.0.1"]})
    policy = loopback_allowed(resolver)
    url = f"http://hooks.example.test:{receiver.port}/hook"
    with jobs_api(store, policy, tmp_path) as client:
        created = client.post("/v1/jobs", json={**LM, "webhook_url": url, "job_id": "job-s"})
        assert created.status_code == 201
        secret = created.json()["webhook_secret"]
        assert secret.startswith("whsec_")
        # shown once: neither a read nor a repeat of the submit has it
        assert "webhook_secret" not in client.get("/v1/jobs/job-s").json()
        repeat = client.post("/v1/jobs", json={**LM, "webhook_url": url, "job_id": "job-s"})
        assert repeat.status_code == 200
        assert "webhook_secret" not in repeat.json()
        assert secret not in repeat.text
        assert secret not in client.get("/v1/jobs").text
    store.start(JobId("job-s"), stage="split")

    assert WebhookDeliverer(store, policy=policy).deliver_due() == 2
    assert [d.path for d in receiver.received] == ["/hook", "/hook"]
    for delivery in receiver.received:
        assert delivery.signature is not None
        verify_signature(delivery.body, delivery.signature, secret, now_s=time.time())
        # the signature covers the body: a changed body, or another job's secret, fails
        with pytest.raises(SignatureInvalid, match="no v1 signature matches"):
            verify_signature(delivery.body + b" ", delivery.signature, secret, now_s=time.time())
        with pytest.raises(SignatureInvalid, match="no v1 signature matches"):
            verify_signature(delivery.body, delivery.signature, "whsec_other", now_s=time.time())
    # the connection went to the vetted 127.0.0.1, the Host header named the URL's host
    assert receiver.received[0].host == f"hooks.example.test:{receiver.port}"


def test_a_signature_from_too_long_ago_is_refused_as_a_replay() -> None:
    body = b'{"id": "job-a-1"}'
    header = signature_header(body, "whsec_k", timestamp_s=1_000_000)
    assert header.startswith("t=1000000,v1=")
    assert verify_signature(body, header, "whsec_k", now_s=1_000_000 + 299) == 1_000_000
    with pytest.raises(SignatureInvalid, match="over 300 s from now"):
        verify_signature(body, header, "whsec_k", now_s=1_000_000 + 301)  # 301 s > 300 s
    with pytest.raises(SignatureInvalid, match="no t="):
        verify_signature(body, "v1=abc", "whsec_k", now_s=1_000_000)


def test_a_redirect_is_not_followed_and_counts_as_a_failed_attempt(
    db_engine: Engine, receiver: Receiver
) -> None:
    store = JobStore(db_engine)
    resolver = FakeResolver({})
    policy = loopback_allowed(resolver)
    url = f"http://127.0.0.1:{receiver.port}/redirect"
    assert post_json(url, b"{}", {}, policy=policy) == 302
    job = store.submit(parse_job_spec({**LM, "webhook_url": url}), job_id="job-r")

    assert WebhookDeliverer(store, policy=policy).deliver_due() == 0
    # two POSTs to /redirect (the direct call and the delivery), nothing ever at /elsewhere
    assert [(d.method, d.path) for d in receiver.received] == [
        ("POST", "/redirect"),
        ("POST", "/redirect"),
    ]
    assert [line.message for line in store.logs(job.id)] == [
        "webhook delivery failed (attempt 1 of 8) for event 1"
    ]


def test_a_name_rebound_to_loopback_after_the_submit_is_refused_at_delivery(
    db_engine: Engine, tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="training.webhooks")
    store = JobStore(db_engine)
    # DNS rebinding: public while the submit checks, then the receiver's loopback address
    resolver = FakeResolver({"rebind.example.test": ["93.184.216.34"]})
    policy = WebhookAddressPolicy(getaddrinfo=resolver)  # loopback not allowed
    url = f"http://rebind.example.test:{receiver.port}/hook"
    with jobs_api(store, policy, tmp_path) as client:
        created = client.post("/v1/jobs", json={**LM, "webhook_url": url, "job_id": "job-x"})
    assert created.status_code == 201
    resolver.table["rebind.example.test"] = ["127.0.0.1"]

    assert WebhookDeliverer(store, policy=policy).deliver_due() == 0
    assert receiver.received == []  # the listening receiver was never reached
    assert resolver.asked == ["rebind.example.test", "rebind.example.test"]  # submit, delivery
    assert [line.message for line in store.logs(JobId("job-x"))] == [
        "webhook delivery failed (attempt 1 of 8) for event 1"
    ]
    reasons = [r.getMessage() for r in caplog.records if r.name == "training.webhooks"]
    assert any("job-x" in r and "127.0.0.1, a loopback address" in r for r in reasons)

    # the same rebinding with 127.0.0.1 allowed reaches the receiver: the refusal above was the
    # address check, not a connection that could not have worked
    allowed = WebhookDeliverer(store, policy=loopback_allowed(resolver))
    assert allowed.deliver_due() == 1
    assert [d.path for d in receiver.received] == ["/hook"]


def test_the_verification_recipe_in_training_md_accepts_a_delivery_and_refuses_a_forgery() -> None:
    page = (Path(__file__).parents[3] / "docs" / "training.md").read_text(encoding="utf-8")
    (recipe,) = [
        block.split("\n", 1)[1]
        for block in page.split("```python")[1:]
        if "def verify_loom_webhook" in block
    ]
    namespace: dict = {}
    exec(recipe.split("```")[0], namespace)  # the page's own code, as a receiver would paste it
    verify = namespace["verify_loom_webhook"]
    body = b'{"id": "job-a-1"}'
    header = signature_header(body, "whsec_k", timestamp_s=time.time())

    assert verify(body, header, "whsec_k") is True
    assert verify(body + b" ", header, "whsec_k") is False
    assert verify(body, header, "whsec_other") is False
    old = signature_header(body, "whsec_k", timestamp_s=time.time() - 3600)  # an hour ago
    assert verify(body, old, "whsec_k") is False
