"""Pages of ``GET /v1/jobs``: a cursor and a limit, read and written in one place.

Jobs are listed in submit order, ``(created_at, id)``, which never changes for a job, so a
page is "the first ``limit`` jobs after the last one shown" (keyset pagination): a job
submitted while a client walks the list shows on a later page, none is shown twice, and no
page costs more than its own rows.

    cursor, limit = page_request(request.query_params)        # 400 on a bad one
    jobs = store.page(state, after=cursor, limit=limit + 1)  # one more: is there a next page?
    answer = page_answer(jobs, limit, render=job_json)       # {"object", "data", "next_cursor"}

The cursor is opaque to clients: the last job's ``(created_at, id)`` as base64url JSON.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from training.jobs import Job

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_CURSOR_CHARS = 400


@dataclass(frozen=True)
class JobCursor:
    """Where a page starts: after the job with this ``(created_at, id)``."""

    created_at: float
    job_id: str


class BadPageQuery(ValueError):
    """A ``limit`` or ``cursor`` that is not one (the 400); ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at, job.id.value], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> JobCursor:
    """The cursor a previous page gave; ``BadPageQuery`` for anything else."""
    bad = BadPageQuery("cursor", "cursor is not one this server gave (use next_cursor)")
    if len(text) > MAX_CURSOR_CHARS or not text.isascii():
        raise bad
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        created_at, job_id = json.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        raise bad from None
    if not isinstance(created_at, int | float) or isinstance(created_at, bool):
        raise bad
    if not isinstance(job_id, str) or not job_id:
        raise bad
    return JobCursor(float(created_at), job_id)


def page_request(query: Mapping[str, str]) -> tuple[JobCursor | None, int]:
    """``(cursor, limit)`` from the query: limit 1..1000 (default 100), cursor optional."""
    raw = query.get("limit")
    limit = DEFAULT_PAGE_SIZE
    if raw is not None:
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 5) or not (
            1 <= int(raw) <= MAX_PAGE_SIZE
        ):
            message = f"limit must be an integer from 1 to {MAX_PAGE_SIZE}, got {raw!r}"
            raise BadPageQuery("limit", message)
        limit = int(raw)
    cursor = query.get("cursor")
    return (decode_cursor(cursor) if cursor else None), limit


def page_answer(
    jobs: Sequence[Job], limit: int, *, render: Callable[[Job], dict[str, Any]]
) -> dict[str, Any]:
    """The list answer for ``jobs`` (read with ``limit + 1``): at most ``limit`` of them, and
    ``next_cursor`` (None on the last page)."""
    shown = list(jobs[:limit])
    more = len(jobs) > limit
    next_cursor = encode_cursor(shown[-1]) if more and shown else None
    return {"object": "list", "data": [render(job) for job in shown], "next_cursor": next_cursor}
