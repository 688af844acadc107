"""Webhooks cannot block each other: real endpoints on 127.0.0.1 that answer garbage, never
answer, or trickle, beside a good one. Whatever one endpoint does costs only its own job;
nothing stops the deliverer; every attempt ends within its time, DNS included.

Each wait below is for something the code or a socket reports (an event received, a log
line written, a connection closed), with a generous cap that only turns a hang into a
failure; no assertion is about how long anything took.
"""

from __future__ import annotations

import functools
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import Engine

from training.jobs import Job, JobId, JobStore
from training.spec import parse_job_spec
from training.webhook_addresses import WebhookAddressPolicy, parse_networks
from training.webhooks import WebhookDeliverer, post_json

CAP_S = 60.0
LOOPBACK_ALLOWED = WebhookAddressPolicy(allowed_networks=parse_networks(["127.0.0.1/32"]))
"""The endpoints here listen on 127.0.0.1, which webhooks may reach only when allowed."""


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + CAP_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


class StepClock:
    def __init__(self) -> None:
        self.now_s = 1_000_000.0

    def __call__(self) -> float:
        self.now_s += 1.0
        return self.now_s


class RawServer:
    """A TCP endpoint on 127.0.0.1 that does ``serve(conn)`` with each connection; counts
    connections, and those the client closed (``serve`` returns when it sees EOF)."""

    def __init__(self, serve: Callable[[socket.socket], None]) -> None:
        self._serve = serve
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/hook"
        self.accepted = 0
        self.closed_by_client = 0
        self._connections: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.accepted += 1
            self._connections.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            self._serve(conn)
        except OSError:
            return
        self.closed_by_client += 1

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        for conn in self._connections:
            conn.close()


def read_until_eof(conn: socket.socket) -> None:
    while conn.recv(65536):
        pass


def answer_garbage(conn: socket.socket) -> None:
    conn.recv(65536)  # the request, or its start
    conn.sendall(b"garbage, not HTTP\r\n\r\n")
    read_until_eof(conn)


def answer_nothing(conn: socket.socket) -> None:
    read_until_eof(conn)  # takes the request, never answers


def trickle(conn: socket.socket) -> None:
    conn.recv(65536)
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    conn.settimeout(0.05)
    while True:  # a header that never ends, a byte at a time: no read ever times out
        conn.sendall(b"x")
        try:
            if conn.recv(1) == b"":
                return
        except TimeoutError:
            continue


@pytest.fixture
def servers() -> Iterator[Callable[[Callable[[socket.socket], None]], RawServer]]:
    made: list[RawServer] = []

    def make(serve: Callable[[socket.socket], None]) -> RawServer:
        made.append(RawServer(serve))
        return made[-1]

    yield make
    for server in made:
        server.close()


class Receiver(BaseHTTPRequestHandler):
    received: list[str]

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append(json.loads(body)["id"])
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def good() -> Iterator[tuple[str, list[str]]]:
    received: list[str] = []
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), type("Good", (Receiver,), {"received": received})
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()
    server.server_close()


@pytest.fixture
def store(db_engine: Engine) -> JobStore:
    return JobStore(db_engine, clock=StepClock())


def job_with_events(store: JobStore, job_id: str, url: str) -> Job:
    """A job with 4 events (queued, running, running, succeeded) for ``url``."""
    spec = parse_job_spec({"name": "tiny-lm", "trainer": "lm", "webhook_url": url})
    job = store.submit(spec, job_id=job_id)
    store.start(job.id, stage="split")
    store.enter_stage(job.id, "train")
    store.succeed(job.id)
    return job


def given_up(store: JobStore, job: Job) -> list[str]:
    return [line.message for line in store.logs(job.id) if line.message.endswith("given up")]


def test_a_good_endpoint_gets_every_event_while_a_silent_and_a_garbage_one_are_retried(
    store: JobStore, servers, good: tuple[str, list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="training.webhooks")
    silent = servers(answer_nothing)
    garbage = servers(answer_garbage)
    good_url, received = good
    # the broken jobs' events are the oldest: first in the backlog
    silent_job = job_with_events(store, "job-silent", silent.url)
    garbage_job = job_with_events(store, "job-garbage", garbage.url)
    good_job = job_with_events(store, "job-good", good_url)
    deliverer = WebhookDeliverer(
        store,
        # the silent send stays in flight
        post=functools.partial(post_json, timeout_s=CAP_S, policy=LOOPBACK_ALLOWED),
        max_attempts=3,
        base_delay_s=0.01,
        cap_delay_s=0.02,
    )
    stop = threading.Event()
    thread = threading.Thread(target=deliverer.run_forever, args=(stop, 0.05))
    thread.start()
    try:
        wait_for(lambda: len(received) == 4, "the good job's 4 events arrived")
        # garbage answers are failed attempts: 3 per event, then given up, event after event
        wait_for(lambda: len(given_up(store, garbage_job)) == 4, "garbage's events given up")
        assert thread.is_alive()
        assert received == [f"{good_job.id.value}-{n}" for n in (1, 2, 3, 4)]
        assert garbage.accepted == 12
        # the job's log counts the attempts; why they failed is in the server's log only
        assert given_up(store, garbage_job) == [
            f"webhook delivery failed (attempt 3 of 3) for event {n}; given up"
            for n in (1, 2, 3, 4)
        ]
        assert not any("BadStatus" in line.message for line in store.logs(garbage_job.id))
        assert any(
            "job-garbage" in r.getMessage() and "BadStatusLine" in r.getMessage()
            for r in caplog.records
        )
        # all that while, the silent endpoint held its first attempt, and only that
        assert (silent.accepted, silent.closed_by_client) == (1, 0)
        assert deliverer.in_flight() == [silent_job.id.value]
        assert given_up(store, silent_job) == []
        assert [e.seq for j, e in store.webhook_backlog() if j.id == silent_job.id] == [1]
    finally:
        stop.set()
        thread.join(timeout=CAP_S)
    assert not thread.is_alive()


def test_an_endpoint_that_never_answers_is_cut_at_the_attempts_time(servers) -> None:
    silent = servers(answer_nothing)
    with pytest.raises(TimeoutError):
        post_json(silent.url, b"{}", {}, timeout_s=0.3, policy=LOOPBACK_ALLOWED)
    wait_for(lambda: silent.closed_by_client == 1, "the client closed its connection")


def test_an_endpoint_that_trickles_its_answer_is_cut_at_the_attempts_time(servers) -> None:
    slow = servers(trickle)
    with pytest.raises(TimeoutError, match="no answer within 0.3 s"):
        post_json(slow.url, b"{}", {}, timeout_s=0.3, policy=LOOPBACK_ALLOWED)
    wait_for(lambda: slow.closed_by_client == 1, "the client closed its connection")


def test_a_name_that_never_resolves_is_cut_at_the_attempts_time() -> None:
    resolver_may_return = threading.Event()

    def stuck_resolver(*args: object, **kwargs: object) -> list:
        resolver_may_return.wait(CAP_S)
        raise OSError("released by the test")

    try:
        with pytest.raises(TimeoutError, match="resolving 'hooks.example.test'"):
            post_json(
                "http://hooks.example.test/hook",
                b"{}",
                {},
                timeout_s=0.2,
                policy=WebhookAddressPolicy(getaddrinfo=stuck_resolver),
            )
        assert not resolver_may_return.is_set()  # it returned while the lookup still hung
    finally:
        resolver_may_return.set()


class FailingPost:
    """500 for the URLs in ``failing``; anything else answers 204. Records every call."""

    def __init__(self, failing: set[str], error: Exception | None = None) -> None:
        self.failing = failing
        self.error = error
        self.calls: list[str] = []

    def __call__(self, url: str, body: bytes, headers: Mapping[str, str]) -> int:
        self.calls.append(json.loads(body)["id"])
        if url in self.failing:
            if self.error is not None:
                raise self.error
            return 500
        return 204


def test_any_exception_from_a_send_is_that_jobs_failed_attempt(store: JobStore) -> None:
    broken = job_with_events(store, "job-broken", "http://broken.test/")
    fine = job_with_events(store, "job-fine", "http://fine.test/")
    post = FailingPost({"http://broken.test/"}, error=RuntimeError("a bug in a library"))
    deliverer = WebhookDeliverer(store, post=post, max_attempts=1)
    assert deliverer.deliver_due() == 4  # fine's 4; broken's 4 each given up after 1 try
    assert [c for c in post.calls if c.startswith("job-fine")] == [
        f"job-fine-{n}" for n in (1, 2, 3, 4)
    ]
    assert given_up(store, broken) == [
        f"webhook delivery failed (attempt 1 of 1) for event {n}; given up" for n in (1, 2, 3, 4)
    ]
    assert store.webhook_backlog() == []
    assert store.get(JobId(fine.id.value)).state.value == "succeeded"


def test_jobs_waiting_for_a_retry_do_not_hide_later_jobs_past_a_backlog_page(
    store: JobStore,
) -> None:
    # 5 failing jobs fill more than two pages of 2; the good job comes after all of them
    failing = {f"http://dead-{n}.test/" for n in range(5)}
    for n in range(5):
        job_with_events(store, f"job-dead-{n}", f"http://dead-{n}.test/")
    job_with_events(store, "job-late", "http://late.test/")
    post = FailingPost(failing)
    clock_s = [0.0]
    deliverer = WebhookDeliverer(
        store, post=post, clock=lambda: clock_s[0], backlog_page=2, max_concurrent_sends=2
    )
    assert deliverer.deliver_due() == 4
    assert [c for c in post.calls if c.startswith("job-late")] == [
        f"job-late-{n}" for n in (1, 2, 3, 4)
    ]
    assert sorted(c for c in post.calls if c.startswith("job-dead")) == [
        f"job-dead-{n}-1" for n in range(5)
    ]  # each tried once, then waiting for its retry
