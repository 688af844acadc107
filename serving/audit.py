"""The audit log: one JSON line per state-changing call, in ``$LOOM_HOME/audit.log``.

A job submitted or cancelled, a promotion, a reshard, a key created or revoked: each leaves
one line with the time, the principal, the route, the target and the outcome (the HTTP status,
or what a ``loom keys`` command did), and is counted in ``loom_audit_events_total``. The file
is rotated (``RotatingFileHandler``: 10 MiB, 5 old files). No key and no request body is ever
written: a target is a job id, a model or a key's name.

    audit = AuditLog(env.home / "audit.log")
    audit.record("ci-bot", "jobs.submit", "job-3f2a", "201", name="tiny-lm", promote=False)
    # {"time": 1764979200.5, "principal": "ci-bot", "route": "jobs.submit",
    #  "target": "job-3f2a", "outcome": "201", "name": "tiny-lm", "promote": false}
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import threading
import time
from pathlib import Path
from typing import Any

from serving import metrics

AUDIT_FILE_NAME = "audit.log"
MAX_BYTES = 10 << 20
BACKUP_COUNT = 5

logger = logging.getLogger(__name__)


class AuditLog:
    """Appends audit lines to one file; safe to call from several threads."""

    def __init__(
        self, path: Path, *, max_bytes: int = MAX_BYTES, backup_count: int = BACKUP_COUNT
    ) -> None:
        self.path = path
        self._max_bytes = max_bytes
        self._backup_count = backup_count
        self._handler: logging.handlers.RotatingFileHandler | None = None
        self._lock = threading.Lock()

    def record(self, principal: str, route: str, target: str, outcome: str, **details: Any) -> None:
        """Write one line and count it. A file that cannot be written is logged, never
        raised: the call it records has happened."""
        line = {
            "time": round(time.time(), 3),
            "principal": principal,
            "route": route,
            "target": target,
            "outcome": outcome,
            **details,
        }
        metrics.AUDIT_EVENTS.labels(route, outcome).inc()
        try:
            handler = self._open()
            with self._lock:
                handler.emit(logging.makeLogRecord({"msg": json.dumps(line), "levelno": 20}))
        except OSError as exc:
            logger.warning("audit log %s not written (%s): %s %s", self.path, exc, route, target)

    def close(self) -> None:
        with self._lock:
            if self._handler is not None:
                self._handler.close()
                self._handler = None

    def _open(self) -> logging.handlers.RotatingFileHandler:
        with self._lock:
            if self._handler is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._handler = logging.handlers.RotatingFileHandler(
                    self.path,
                    maxBytes=self._max_bytes,
                    backupCount=self._backup_count,
                    encoding="utf-8",
                )
                self._handler.setFormatter(logging.Formatter("%(message)s"))
            return self._handler
