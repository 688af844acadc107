"""The webhook deliverer: the ambassador (Burns ch. 4) between job events and a client's URL.

A job whose spec names a ``webhook_url`` gets each of its events POSTed there as a CloudEvent
(``training.events``). The job itself never waits on that URL: the deliverer runs in its own
thread in the scheduler's process and reads the store's cursor (``webhook_backlog`` /
``webhook_done``), so a slow or dead endpoint costs the job nothing.

    deliverer = WebhookDeliverer(store)
    stop = threading.Event()
    thread = threading.Thread(target=deliverer.run_forever, args=(stop,), daemon=True)
    thread.start()
    ...
    stop.set(); thread.join()

Contract:
- At least once, in order per job: event N+1 of a job is sent only after event N was
  answered 2xx or given up on. A receiver drops duplicates by the CloudEvent ``id``.
- Jobs do not wait on each other. Sends run on a bounded pool of threads
  (``max_concurrent_sends``, 8), at most one per job, so a slow or broken endpoint holds one
  thread for at most one attempt and delays only its own job's events. Each attempt is
  bounded in total, DNS resolution included (``POST_TIMEOUT_S``, 5 s). Only when every
  thread is busy with a slow endpoint does another job wait, and then for at most one
  attempt's time.
- Anything a send raises (non-2xx, refused, timed out, unresolvable, an answer that is not
  HTTP) is that job's failed attempt, retried after ``retry_delay_s(attempt)`` (1, 2, 4, ...
  s, capped), per job: other jobs' events go on.
- Each failed attempt is a line in the job's log that says only that it failed and which
  attempt it was (``webhook delivery failed (attempt 2 of 8) for event 3``), never the
  network's answer; the reason goes to the server's log, with the job id. After
  ``max_attempts`` the event is given up on (the line ends ``; given up``) and the cursor
  moves past it.
- Where it may send: ``training.webhook_addresses`` (no loopback, private, link-local, ...
  address unless the operator allows its network), checked on the addresses the connection
  uses; no redirect is followed (a 3xx is a failed attempt).
- Each delivery is signed (``Loom-Signature``, ``training.webhook_signing``) with the job's
  own secret.
- The backlog is read page by page, oldest event first, and a job waiting for its retry or
  with a send in flight is passed over, so however many jobs fail, later ones are reached.
- Retry times live in this object, not the store: a restarted deliverer tries each pending
  event once at once, then backs off afresh.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import logging
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from training.events import CLOUDEVENTS_CONTENT_TYPE, cloud_event
from training.jobs import Job, JobEvent, JobStore
from training.webhook_addresses import WebhookAddressPolicy, resolve, vet
from training.webhook_signing import SIGNATURE_HEADER, signature_header
from training.work_queue import retry_delay_s

POST_TIMEOUT_S = 5.0
"""One attempt's whole time: DNS, connect, TLS, sending, and the answer's status line."""
MAX_CONCURRENT_SENDS = 8
USER_AGENT = "loom-webhooks/0.1"
_log = logging.getLogger(__name__)

PostJson = Callable[[str, bytes, Mapping[str, str]], int]
"""``post(url, body, headers) -> HTTP status``; raises when no HTTP answer came. Whatever it
raises counts as a failed attempt."""

_DEFAULT_POLICY = WebhookAddressPolicy()


def post_json(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    timeout_s: float = POST_TIMEOUT_S,
    policy: WebhookAddressPolicy = _DEFAULT_POLICY,
) -> int:
    """POST ``body`` to ``url`` with ``headers``; the HTTP status, whatever it is.

    The host is resolved (``policy.getaddrinfo``) and every address it gives is vetted by
    ``policy`` (``training.webhook_addresses``: ``WebhookRefused`` for a loopback, private,
    link-local, ... one not in its allowed networks); the socket then connects to a vetted
    address itself, never through a second lookup, while the request's Host header and TLS
    SNI name the URL's host. So a name rebound to a private address after the submit's check
    is refused here, at delivery.

    The whole attempt ends within ``timeout_s``: name resolution runs on a helper thread that
    is waited for no longer than what is left, connecting is bounded by what is left, and a
    watchdog shuts the socket at the deadline, so an endpoint that trickles its answer a byte
    at a time cannot outlast it either (``TimeoutError``). Redirects are not followed, so a
    3xx is returned (and counts as a failure). ``ValueError`` for a URL that is not http(s);
    ``http.client`` errors (e.g. ``BadStatusLine``) for an answer that is not HTTP.
    """
    deadline_s = time.monotonic() + timeout_s
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = vet(
        resolve(host, port, timeout_s=_left_s(deadline_s), getaddrinfo=policy.getaddrinfo),
        policy,
    )
    sock = _connect(addresses, deadline_s)
    watchdog = _Watchdog(sock, _left_s(deadline_s))
    connection: http.client.HTTPConnection
    try:
        if parts.scheme == "https":
            sock = _tls_context().wrap_socket(
                sock, server_hostname=host, do_handshake_on_connect=False
            )
            watchdog.sock = sock  # the raw socket is detached now; the handshake is watched too
            sock.do_handshake()
            connection = http.client.HTTPSConnection(host, port, timeout=_left_s(deadline_s))
        else:
            connection = http.client.HTTPConnection(host, port, timeout=_left_s(deadline_s))
        connection.sock = sock  # already connected: http.client sends on it as it is
        path = parts.path or "/"
        if parts.query:
            path = f"{path}?{parts.query}"
        connection.request("POST", path, body=body, headers=dict(headers))
        response = connection.getresponse()
        status = response.status
        response.close()
        if watchdog.fired:  # the shutdown ended the answer early: what was read is no answer
            raise TimeoutError(f"no answer within {timeout_s:g} s")
        return status
    except Exception as exc:
        if watchdog.fired:
            raise TimeoutError(f"no answer within {timeout_s:g} s") from exc
        raise
    finally:
        watchdog.cancel()
        sock.close()


def _left_s(deadline_s: float) -> float:
    left_s = deadline_s - time.monotonic()
    if left_s <= 0:
        raise TimeoutError("the attempt's time ran out")
    return left_s


def _connect(addresses: list[tuple[Any, ...]], deadline_s: float) -> socket.socket:
    """A socket connected to the first address that answers before the deadline."""
    error: OSError | None = None
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(_left_s(deadline_s))
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error if error is not None else OSError("no address to connect to")


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


class _Watchdog:
    """Shuts ``sock`` down when ``after_s`` has passed, unblocking whatever reads or writes it."""

    def __init__(self, sock: socket.socket, after_s: float) -> None:
        self.sock = sock
        self.fired = False
        self._timer = threading.Timer(after_s, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        # the plain socket's shutdown, also under TLS: the SSL object stays usable for the
        # thread that is blocked in it, which then sees the connection closed
        with contextlib.suppress(OSError):  # already closed
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


def failure_log_line(seq: int, attempt: int, max_attempts: int) -> str:
    """The job log's line for a failed delivery: the count, never the network's answer."""
    line = f"webhook delivery failed (attempt {attempt} of {max_attempts}) for event {seq}"
    return line + "; given up" if attempt >= max_attempts else line


@dataclass(frozen=True, kw_only=True)
class _Pending:
    """A job's event that failed at least once: when to try it again."""

    seq: int
    attempts: int
    retry_at_s: float
    """On the deliverer's clock (monotonic by default)."""


@dataclass(frozen=True)
class _Sending:
    """A job's event whose send is in flight on the pool."""

    job: Job
    event: JobEvent
    future: Future[str | None]
    """Resolves to None (answered 2xx) or why not."""


class WebhookDeliverer:
    """POSTs each job's events to its webhook in order, with per-job backoff, on a bounded
    pool of send threads (module docstring).

    ``policy`` says which addresses a webhook may reach (``training.webhook_addresses``);
    ``post`` is the one I/O edge (``post_json`` under ``policy``; a test passes a fake);
    ``clock`` is monotonic seconds, used only for retry times; ``wall_clock`` is unix seconds,
    the time each delivery is signed at (``Loom-Signature``). The store is read and written
    only by the thread that calls ``deliver_due``/``step``/``run_forever``; the pool's threads
    only send.
    """

    def __init__(
        self,
        store: JobStore,
        *,
        policy: WebhookAddressPolicy = _DEFAULT_POLICY,
        post: PostJson | None = None,
        max_attempts: int = 8,
        base_delay_s: float = 1.0,
        cap_delay_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        max_concurrent_sends: int = MAX_CONCURRENT_SENDS,
        backlog_page: int = 200,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        if max_concurrent_sends < 1:
            raise ValueError(f"max_concurrent_sends must be at least 1, got {max_concurrent_sends}")
        self._store = store
        self._post = post if post is not None else functools.partial(post_json, policy=policy)
        self._wall_clock = wall_clock
        self._max_attempts = max_attempts
        self._base_delay_s = base_delay_s
        self._cap_delay_s = cap_delay_s
        self._clock = clock
        self._max_sends = max_concurrent_sends
        self._backlog_page = backlog_page
        self._pool = ThreadPoolExecutor(
            max_workers=max_concurrent_sends, thread_name_prefix="loom-webhook"
        )
        self._pending: dict[str, _Pending] = {}  # job id -> its failing event
        self._sending: dict[str, _Sending] = {}  # job id -> its event in flight
        self._wake = threading.Event()  # set when a send finishes

    def deliver_due(self) -> int:
        """Deliver what is due now and wait for it; the number of events delivered (2xx).

        Sends each due job's next event, waits for the sends, and goes on with the events
        that made due, until nothing is due or in flight: a job's burst of events goes out in
        one call, in order. A job waiting for its retry time is skipped, not waited for. For
        tests and one-shot use; ``run_forever`` never waits on a send.
        """
        delivered = 0
        while True:
            delivered += self.step()
            if not self._sending:
                return delivered
            wait(
                [sending.future for sending in self._sending.values()], return_when=FIRST_COMPLETED
            )

    def step(self) -> int:
        """Record the sends that finished, then start those now due; the number delivered."""
        delivered = self._harvest()
        self._dispatch()
        return delivered

    def in_flight(self) -> list[str]:
        """The jobs with a send in flight now (safe from any thread)."""
        return sorted(self._sending.copy())

    def run_forever(self, stop: threading.Event, interval_s: float = 0.5) -> None:
        """Deliver until ``stop`` is set (a background thread's target): a pass every
        ``interval_s``, and at once when a send finishes.

        A pass that raises (the store unreachable for a moment) is skipped, not fatal: the
        next pass reads the cursor afresh, so nothing is lost or sent twice by skipping.
        """
        try:
            while not stop.is_set():
                try:
                    self.step()
                except Exception:  # the thread must outlive a bad pass
                    _log.warning(
                        "webhook pass failed; retrying in %.1f s", interval_s, exc_info=True
                    )
                self._wake.wait(interval_s)
                self._wake.clear()
        finally:
            self.close()

    def close(self) -> None:
        """Stop taking sends; one in flight ends within its attempt's time, unrecorded (a
        later deliverer sends it again: at least once)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- the dispatcher's side -------------------------------------------------------------

    def _dispatch(self) -> int:
        """Start a send for each job whose next event is due and which has none in flight,
        oldest event first, while the pool has room; the number started."""
        started = 0
        seen: set[str] = set()
        after: tuple[float, str] | None = None
        read_all = False
        while len(self._sending) < self._max_sends:
            page = self._store.webhook_backlog(limit=self._backlog_page, after=after)
            for job, event in page:
                job_id = job.id.value
                seen.add(job_id)
                if job_id in self._sending or not self._due(job_id, event.seq):
                    continue
                if len(self._sending) >= self._max_sends:
                    break
                self._start(job, event)
                started += 1
            else:
                if len(page) < self._backlog_page:
                    read_all = True
                    break
                after = (page[-1][1].time, page[-1][0].id.value)
                continue
            break  # the pool is full
        if read_all:
            # a job that left the backlog (delivered elsewhere, deleted) needs no retry time
            self._pending = {k: v for k, v in self._pending.items() if k in seen}
        return started

    def _due(self, job_id: str, seq: int) -> bool:
        pending = self._pending.get(job_id)
        if pending is None:
            return True
        if pending.seq != seq:  # the cursor moved on without us: a fresh event
            del self._pending[job_id]
            return True
        return self._clock() >= pending.retry_at_s

    def _start(self, job: Job, event: JobEvent) -> None:
        url = job.spec.webhook_url
        assert url is not None  # the backlog holds only jobs with a webhook
        secret = self._store.webhook_secret(job.id)  # read here: pool threads only send
        future = self._pool.submit(self._send, str(url), job, event, secret)
        self._sending[job.id.value] = _Sending(job, event, future)
        future.add_done_callback(lambda _: self._wake.set())

    def _harvest(self) -> int:
        """Record each finished send: move the job's cursor, or set its retry time."""
        delivered = 0
        for job_id, sending in list(self._sending.items()):
            if not sending.future.done():
                continue
            del self._sending[job_id]
            if sending.future.cancelled():
                continue
            reason = sending.future.result()  # ``_send`` returns whatever happened
            try:
                if self._record(sending.job, sending.event, reason) == "delivered":
                    delivered += 1
            except Exception as exc:  # the store: the event is sent again later (at least once)
                _log.warning(
                    "job %s: recording webhook event %d failed (%s: %s)",
                    job_id,
                    sending.event.seq,
                    type(exc).__name__,
                    exc,
                )
        return delivered

    def _record(self, job: Job, event: JobEvent, reason: str | None) -> str:
        """``"delivered"``, ``"given_up"`` or ``"failed"`` (retried after its backoff)."""
        job_id = job.id.value
        if reason is None:
            self._pending.pop(job_id, None)
            self._store.webhook_done(job.id, event.seq)
            return "delivered"
        pending = self._pending.get(job_id)
        attempts = (pending.attempts if pending and pending.seq == event.seq else 0) + 1
        # the job's log (any reader of the job sees it) says that it failed and how often,
        # never why: the network's answer ("connection refused", "HTTP 503") would make the
        # webhook a port scanner. The reason goes to the server's log only.
        message = failure_log_line(event.seq, attempts, self._max_attempts)
        _log.info("job %s: %s: %s", job_id, message, reason)
        if attempts >= self._max_attempts:
            self._pending.pop(job_id, None)
            self._store.webhook_done(job.id, event.seq)
            self._store.log(job.id, message)
            return "given_up"
        # attempt 1 failed -> wait 1 s, attempt 2 -> 2 s, 3 -> 4 s, ... up to the cap
        delay_s = retry_delay_s(attempts, base_s=self._base_delay_s, cap_s=self._cap_delay_s)
        self._pending[job_id] = _Pending(
            seq=event.seq, attempts=attempts, retry_at_s=self._clock() + delay_s
        )
        # written after the retry time is set: should the write fail, the retry still waits
        self._store.log(job.id, message)
        return "failed"

    # --- a pool thread's side ---------------------------------------------------------------

    def _send(self, url: str, job: Job, event: JobEvent, secret: str | None) -> str | None:
        """None when the endpoint answered 2xx, else why not (for the server's log).
        Never raises: whatever went wrong is this job's failed attempt."""
        try:
            body = json.dumps(cloud_event(job, event)).encode()
            headers = {"Content-Type": CLOUDEVENTS_CONTENT_TYPE, "User-Agent": USER_AGENT}
            if secret is not None:  # a job stored before secrets existed goes unsigned
                headers[SIGNATURE_HEADER] = signature_header(
                    body, secret, timestamp_s=self._wall_clock()
                )
            status = self._post(url, body, headers)
        except Exception as exc:  # refused, timed out, unresolvable, not HTTP, a bad URL, ...
            return f"{type(exc).__name__}: {exc}"
        return None if 200 <= status < 300 else f"HTTP {status}"
