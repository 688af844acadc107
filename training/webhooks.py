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
- A failure (non-2xx, refused connection, timeout) is retried after
  ``retry_delay_s(attempt)`` (1, 2, 4, ... s, capped), per job: other jobs' events go on.
- After ``max_attempts`` the event is given up on: the cursor moves past it and the job's
  log says so (``webhook: gave up on event 3 after 8 attempts: HTTP 503``).
- Retry times live in this object, not the store: a restarted deliverer tries each pending
  event once at once, then backs off afresh.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from training.events import CLOUDEVENTS_CONTENT_TYPE, cloud_event
from training.jobs import Job, JobEvent, JobStore
from training.work_queue import retry_delay_s

POST_TIMEOUT_S = 5.0
USER_AGENT = "loom-webhooks/0.1"
_log = logging.getLogger(__name__)

PostJson = Callable[[str, bytes, Mapping[str, str]], int]
"""``post(url, body, headers) -> HTTP status``; raises ``OSError`` when no answer came."""


def post_json(url: str, body: bytes, headers: Mapping[str, str]) -> int:
    """POST ``body`` to ``url`` with ``headers``; the HTTP status, whatever it is.

    Raises ``OSError`` (``URLError``, a timeout) when no HTTP answer came within
    ``POST_TIMEOUT_S``. Redirects are not followed for a POST (urllib's rule), so a 3xx is
    returned, and counts as a failure.
    """
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=POST_TIMEOUT_S) as response:
            return response.status
    except urllib.error.HTTPError as exc:  # an answer, just not 2xx
        exc.close()
        return exc.code


@dataclass(frozen=True, kw_only=True)
class _Pending:
    """A job's event that failed at least once: when to try it again."""

    seq: int
    attempts: int
    retry_at_s: float
    """On the deliverer's clock (monotonic by default)."""


class WebhookDeliverer:
    """POSTs each job's events to its webhook in order, with per-job backoff (module docstring).

    ``post`` is the one I/O edge (``post_json``; a test passes a fake); ``clock`` is
    monotonic seconds, used only for retry times.
    """

    def __init__(
        self,
        store: JobStore,
        *,
        post: PostJson = post_json,
        max_attempts: int = 8,
        base_delay_s: float = 1.0,
        cap_delay_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        backlog_limit: int = 1000,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self._store = store
        self._post = post
        self._max_attempts = max_attempts
        self._base_delay_s = base_delay_s
        self._cap_delay_s = cap_delay_s
        self._clock = clock
        self._backlog_limit = backlog_limit
        self._pending: dict[str, _Pending] = {}  # job id -> its failing event

    def deliver_due(self) -> int:
        """Deliver what is due now; the number of events delivered (2xx) in this call.

        Repeats rounds over the backlog (each round sends at most one event per job, the
        job's next) until a round moves no cursor, so a job's burst of events goes out in one
        call, in order. A job waiting for its retry time is skipped, not waited for.
        """
        delivered = 0
        while True:
            moved = 0
            backlog = self._store.webhook_backlog(limit=self._backlog_limit)
            # a job that left the backlog (delivered elsewhere, or finished) needs no retry time
            live = {job.id.value for job, _ in backlog}
            self._pending = {k: v for k, v in self._pending.items() if k in live}
            for job, event in backlog:
                outcome = self._try_one(job, event)
                if outcome == "delivered":
                    delivered += 1
                if outcome in ("delivered", "given_up"):
                    moved += 1
            if moved == 0:
                return delivered

    def _try_one(self, job: Job, event: JobEvent) -> str:
        """``"waiting"`` (not due), ``"failed"`` (will retry), ``"delivered"`` or ``"given_up"``."""
        job_id = job.id.value
        pending = self._pending.get(job_id)
        if pending is not None and pending.seq != event.seq:
            pending = None  # the cursor moved on without us: a fresh event
        if pending is not None and self._clock() < pending.retry_at_s:
            return "waiting"
        url = job.spec.webhook_url
        assert url is not None  # the backlog holds only jobs with a webhook
        reason = self._send(str(url), job, event)
        if reason is None:
            self._pending.pop(job_id, None)
            self._store.webhook_done(job.id, event.seq)
            return "delivered"
        attempts = (pending.attempts if pending else 0) + 1
        if attempts >= self._max_attempts:
            self._pending.pop(job_id, None)
            self._store.webhook_done(job.id, event.seq)
            self._store.log(
                job.id,
                f"webhook: gave up on event {event.seq} after {attempts} attempts: {reason}",
            )
            return "given_up"
        # attempt 1 failed -> wait 1 s, attempt 2 -> 2 s, 3 -> 4 s, ... up to the cap
        delay_s = retry_delay_s(attempts, base_s=self._base_delay_s, cap_s=self._cap_delay_s)
        self._pending[job_id] = _Pending(
            seq=event.seq, attempts=attempts, retry_at_s=self._clock() + delay_s
        )
        return "failed"

    def _send(self, url: str, job: Job, event: JobEvent) -> str | None:
        """None when the endpoint answered 2xx, else why not (for the give-up log line)."""
        body = json.dumps(cloud_event(job, event)).encode()
        headers = {"Content-Type": CLOUDEVENTS_CONTENT_TYPE, "User-Agent": USER_AGENT}
        try:
            status = self._post(url, body, headers)
        except (OSError, ValueError) as exc:  # refused, timed out, unresolvable, bad URL
            return f"{type(exc).__name__}: {exc}"
        return None if 200 <= status < 300 else f"HTTP {status}"

    def run_forever(self, stop: threading.Event, interval_s: float = 0.5) -> None:
        """Deliver every ``interval_s`` until ``stop`` is set (a background thread's target).

        A pass that raises (the store unreachable for a moment) is skipped, not fatal: the
        next pass reads the cursor afresh, so nothing is lost or sent twice by skipping.
        """
        while not stop.is_set():
            try:
                self.deliver_due()
            except Exception:  # the thread must outlive a bad pass
                _log.warning("webhook pass failed; retrying in %.1f s", interval_s, exc_info=True)
            stop.wait(interval_s)
