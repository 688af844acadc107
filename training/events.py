"""Job events as CloudEvents 1.0, and as Server-Sent Events frames.

One shape leaves Loom for every job state change, whichever way it travels: the SSE stream
(``GET /v1/jobs/{id}/events``) and the webhook deliverer send the same CloudEvent, in the
structured JSON mode (the whole event is one JSON object, data inside it).

    event = cloud_event(job, job_event)
    # {"specversion": "1.0", "id": "job-1f..-3", "source": "/v1/jobs/job-1f..",
    #  "type": "loom.job.running", "subject": "job-1f..", "time": "2026-11-27T10:15:02.250Z",
    #  "datacontenttype": "application/json",
    #  "data": {"state": "running", ..., "job_name": "tiny-lm", "trainer": "lm", "seq": 3}}
    frame = sse_message(event)  # b"id: 3\\nevent: loom.job.running\\ndata: {...}\\n\\n"

Both functions are pure: no clock, no I/O.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from training.jobs import Job, JobEvent

CLOUDEVENTS_SPEC_VERSION = "1.0"
CLOUDEVENTS_CONTENT_TYPE = "application/cloudevents+json"
"""The Content-Type of one CloudEvent in structured JSON mode (a webhook POST's body)."""


def rfc3339_utc(epoch_s: float) -> str:
    """``1_764_238_502.25`` -> ``"2025-11-27T10:15:02.250Z"``: RFC 3339, UTC, milliseconds."""
    moment = datetime.fromtimestamp(epoch_s, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def cloud_event(job: Job, event: JobEvent, *, source_prefix: str = "/v1/jobs") -> dict[str, Any]:
    """``event`` of ``job`` as a CloudEvents 1.0 structured-mode dict (JSON-ready).

    ``id`` is ``<job id>-<seq>``: unique per source, and the same on every resend, so a
    receiver can drop duplicates (webhooks are delivered at least once). ``data`` is the
    event's own data plus the job's name, trainer and the event's ``seq``.
    """
    job_id = job.id.value
    return {
        "specversion": CLOUDEVENTS_SPEC_VERSION,
        "id": f"{job_id}-{event.seq}",
        "source": f"{source_prefix.rstrip('/')}/{job_id}",
        "type": event.type,
        "subject": job_id,
        "time": rfc3339_utc(event.time),
        "datacontenttype": "application/json",
        "data": {**event.data, "job_name": job.name, "trainer": job.spec.trainer, "seq": event.seq},
    }


def sse_message(event: dict[str, Any]) -> bytes:
    """One SSE frame for a ``cloud_event`` dict: ``id`` (the seq, so a client reconnects with
    ``Last-Event-ID`` and resumes after it), ``event`` (the type), ``data`` (the JSON), then
    the blank line that ends the frame.

    ``json.dumps`` escapes newlines inside strings, so ``data`` is always one line.
    """
    data = json.dumps(event, separators=(",", ":"))
    return f"id: {event['data']['seq']}\nevent: {event['type']}\ndata: {data}\n\n".encode()


SSE_KEEP_ALIVE = b": keep-alive\n\n"
"""An SSE comment line: clients ignore it; proxies see traffic and keep the stream open."""
