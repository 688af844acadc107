"""The webhook deliverer: in order per job, backoff per job, give up after max_attempts.

Store-backed tests run on SQLite and PostgreSQL (``db_engine``); the POST is a fake, except
in the last test, where a real HTTP server on 127.0.0.1 receives the CloudEvent.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from sqlalchemy import Engine

from training.jobs import Job, JobId, JobStore
from training.spec import parse_job_spec
from training.webhook_addresses import WebhookAddressPolicy, parse_networks
from training.webhooks import WebhookDeliverer, post_json

LOOPBACK_ALLOWED = WebhookAddressPolicy(allowed_networks=parse_networks(["127.0.0.1/32"]))
"""The receiver here listens on 127.0.0.1, which webhooks may reach only when allowed."""


class StepClock:
    """Store times: one second later on every reading, so events have distinct times."""

    def __init__(self) -> None:
        self.now_s = 1_000_000.0

    def __call__(self) -> float:
        self.now_s += 1.0
        return self.now_s


class HandClock:
    """The deliverer's monotonic clock, moved only by the test."""

    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


class FakePost:
    """Records every POST; answers the status set for its URL (200 by default)."""

    def __init__(self) -> None:
        self.status: dict[str, int | Exception] = {}
        self.calls: list[tuple[str, dict, Mapping[str, str]]] = []

    def __call__(self, url: str, body: bytes, headers: Mapping[str, str]) -> int:
        self.calls.append((url, json.loads(body), headers))
        answer = self.status.get(url, 200)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def ids(self, url: str | None = None) -> list[str]:
        return [event["id"] for u, event, _ in self.calls if url is None or u == url]


@pytest.fixture
def store(db_engine: Engine) -> JobStore:
    return JobStore(db_engine, clock=StepClock())


def job_with_webhook(store: JobStore, job_id: str, url: str) -> Job:
    spec = parse_job_spec({"name": "tiny-lm", "trainer": "lm", "webhook_url": url})
    return store.submit(spec, job_id=job_id)


def run_to_success(store: JobStore, job_id: JobId) -> None:
    store.start(job_id, stage="split")
    store.enter_stage(job_id, "train")
    store.succeed(job_id, metrics={"loss": 1.5})


def test_events_of_a_job_are_delivered_in_order_as_cloudevents(store: JobStore) -> None:
    job = job_with_webhook(store, "job-a", "http://hooks.test/a")
    run_to_success(store, job.id)  # events 1 queued, 2 running, 3 running, 4 succeeded
    post = FakePost()
    deliverer = WebhookDeliverer(store, post=post, clock=HandClock())

    assert deliverer.deliver_due() == 4
    assert post.ids() == ["job-a-1", "job-a-2", "job-a-3", "job-a-4"]
    types = [event["type"] for _, event, _ in post.calls]
    assert types == [
        "loom.job.queued",
        "loom.job.running",
        "loom.job.running",
        "loom.job.succeeded",
    ]
    assert post.calls[0][2]["Content-Type"] == "application/cloudevents+json"
    assert store.webhook_backlog() == []
    assert deliverer.deliver_due() == 0  # nothing is sent twice
    assert len(post.calls) == 4


def test_a_failing_endpoint_is_retried_with_growing_delays_then_given_up(store: JobStore) -> None:
    job = job_with_webhook(store, "job-a", "http://hooks.test/a")
    post = FakePost()
    post.status["http://hooks.test/a"] = 503
    clock = HandClock()
    deliverer = WebhookDeliverer(
        store, post=post, clock=clock, max_attempts=4, base_delay_s=1, cap_delay_s=3
    )

    attempt_times = []
    for _ in range(100):  # 0.25 s steps over 25 s
        before = len(post.calls)
        deliverer.deliver_due()
        if len(post.calls) > before:
            attempt_times.append(clock.now_s)
        clock.now_s += 0.25
    # attempt 1 at 0; waits 1, 2, then min(4, cap 3) = 3 s: attempts at 0, 1, 3, 6; then given up
    assert attempt_times == [0.0, 1.0, 3.0, 6.0]
    assert store.webhook_backlog() == []
    log = [line.message for line in store.logs(job.id)]
    assert log == [
        "webhook delivery failed (attempt 1 of 4) for event 1",
        "webhook delivery failed (attempt 2 of 4) for event 1",
        "webhook delivery failed (attempt 3 of 4) for event 1",
        "webhook delivery failed (attempt 4 of 4) for event 1; given up",
    ]


def test_a_refused_connection_counts_as_a_failed_attempt_whose_reason_only_the_server_logs(
    store: JobStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="training.webhooks")
    job = job_with_webhook(store, "job-a", "http://hooks.test/a")
    post = FakePost()
    post.status["http://hooks.test/a"] = ConnectionRefusedError(111, "Connection refused")
    deliverer = WebhookDeliverer(store, post=post, clock=HandClock(), max_attempts=1)

    assert deliverer.deliver_due() == 0
    (line,) = store.logs(job.id)
    # the job's log, which any reader of the job sees, does not tell a closed port from an
    # open one; the server's log names the job and the reason
    assert line.message == "webhook delivery failed (attempt 1 of 1) for event 1; given up"
    (record,) = [r for r in caplog.records if r.name == "training.webhooks"]
    assert "job-a" in record.getMessage()
    assert "Connection refused" in record.getMessage()


def test_a_dead_endpoint_does_not_hold_back_another_jobs_events(store: JobStore) -> None:
    dead = job_with_webhook(store, "job-dead", "http://hooks.test/dead")
    live = job_with_webhook(store, "job-live", "http://hooks.test/live")
    post = FakePost()
    post.status["http://hooks.test/dead"] = 500
    clock = HandClock()
    deliverer = WebhookDeliverer(store, post=post, clock=clock)

    assert deliverer.deliver_due() == 1  # live's queued event; dead's failed once
    run_to_success(store, live.id)
    run_to_success(store, dead.id)
    clock.now_s += 0.5  # before dead's first retry time (1 s)
    assert deliverer.deliver_due() == 3

    assert post.ids("http://hooks.test/live") == [f"job-live-{n}" for n in (1, 2, 3, 4)]
    # dead was tried once, on its first event only: its later events wait behind it
    assert post.ids("http://hooks.test/dead") == ["job-dead-1"]
    post.status["http://hooks.test/dead"] = 204
    clock.now_s += 1.0
    assert deliverer.deliver_due() == 4
    assert post.ids("http://hooks.test/dead") == ["job-dead-1"] + [
        f"job-dead-{n}" for n in (1, 2, 3, 4)
    ]
    assert [line.message for line in store.logs(dead.id)] == [
        "webhook delivery failed (attempt 1 of 8) for event 1"
    ]


def test_run_forever_delivers_until_stopped(store: JobStore) -> None:
    job_with_webhook(store, "job-a", "http://hooks.test/a")
    post = FakePost()
    deliverer = WebhookDeliverer(store, post=post)
    stop = threading.Event()
    thread = threading.Thread(target=deliverer.run_forever, args=(stop, 0.01))
    thread.start()
    try:
        for _ in range(500):
            if post.calls:
                break
            stop.wait(0.01)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()
    assert post.ids() == ["job-a-1"]


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[str, str, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, self.headers["Content-Type"], body))
        self.send_response(503 if self.path == "/unavailable" else 202)
        self.end_headers()

    def log_message(self, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, list]]:
    received: list[tuple[str, str, bytes]] = []
    handler = type("Receiver", (_Receiver,), {"received": received})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", received
    server.shutdown()
    server.server_close()


def test_a_real_http_endpoint_receives_the_cloudevent(
    store: JobStore, receiver: tuple[str, list]
) -> None:
    base_url, received = receiver
    job_with_webhook(store, "job-a", f"{base_url}/hooks/loom")
    deliverer = WebhookDeliverer(store, policy=LOOPBACK_ALLOWED)

    assert deliverer.deliver_due() == 1
    ((path, content_type, body),) = received
    assert path == "/hooks/loom"
    assert content_type == "application/cloudevents+json"
    event = json.loads(body)
    assert event["id"] == "job-a-1"
    assert event["type"] == "loom.job.queued"
    assert event["data"]["job_name"] == "tiny-lm"


def test_post_json_returns_a_non_2xx_status_instead_of_raising(
    receiver: tuple[str, list],
) -> None:
    base_url, _ = receiver
    headers = {"Content-Type": "application/json"}
    assert post_json(f"{base_url}/unavailable", b"{}", headers, policy=LOOPBACK_ALLOWED) == 503
    assert post_json(f"{base_url}/x", b"{}", headers, policy=LOOPBACK_ALLOWED) == 202
