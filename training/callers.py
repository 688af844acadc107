"""Who is calling: a principal (the name of the key it came with) and the scopes it holds.

The gateway checks a request's key and hands every route a ``Caller``; ``training.api`` reads
it to show a caller only its own jobs and to decide what a job may register or promote. The
scope names live here, the lowest floor that both ``training`` and ``serving`` see.

    caller = Caller("ci-bot", frozenset({"infer", "jobs"}))
    caller.has("jobs"), caller.has("models")     # True, False
    LOCAL_CALLER.has("admin")                   # the keyless local mode holds every scope
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

ScopeName = Literal["infer", "jobs", "models", "admin"]
"""``infer``: the inference routes; ``jobs``: submit and read one's own training jobs;
``models``: promote, and register a job's result under a served name; ``admin``: every route
and every caller's jobs (it implies the other three)."""

SCOPES: tuple[ScopeName, ...] = get_args(ScopeName)

PRINCIPAL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A key's name: a metric label and a job's ``owner``, so short and plain (``fullmatch``)."""

LOCAL_PRINCIPAL = "local"


@dataclass(frozen=True)
class Caller:
    """The principal a request authenticated as, and its scopes."""

    principal: str
    scopes: frozenset[str]

    def has(self, scope: str) -> bool:
        """Whether the caller holds ``scope``; ``admin`` holds them all."""
        return scope in self.scopes or "admin" in self.scopes

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes


LOCAL_CALLER = Caller(LOCAL_PRINCIPAL, frozenset(SCOPES))
"""The one person of the keyless local mode (no keys configured: 127.0.0.1 only)."""
