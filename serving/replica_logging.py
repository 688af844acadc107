"""Loom's own log lines inside a Serve replica go to Serve's log for that replica.

Without this a Loom logger in a replica has no handler: its warnings fall to logging's last
resort, which writes to ``sys.stderr``, which Serve replaces with a stream that logs each
line again at INFO (the level lost) after walking the whole stack to name the caller: about
150 us a line against 10 us (the gateway logs a line per 5xx, so overload paid it per shed
request). And Loom's INFO lines (a model loaded, a slow client cut) were dropped.

    route_to_serve_log()    # in a deployment's constructor; outside a replica: no-op
"""

from __future__ import annotations

import logging

from ray import serve
from ray.serve.exceptions import RayServeException

PACKAGES = ("models", "training", "serving")
SERVE_LOGGER = "ray.serve"


def _in_serve_controller() -> bool:
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME

    if not ray.is_initialized():  # never start a Ray to ask
        return False
    try:
        return bool(ray.get_runtime_context().get_actor_name() == SERVE_CONTROLLER_NAME)
    except Exception:  # a driver, not an actor
        return False


class _ToServeLogger(logging.Handler):
    """Hands each record, level and all, to Serve's logger (its file, buffer and filters)."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


def route_to_serve_log(*, in_controller: bool = False) -> bool:
    """In a Serve replica (or, with ``in_controller``, in Serve's controller, where the
    autoscaling policy runs): Loom's package loggers log at INFO into Serve's logger, and
    not to the root logger. False, and nothing changed, elsewhere (a test running a replica
    class in-process keeps its own logging)."""
    if in_controller:
        if not _in_serve_controller():
            return False
    else:
        try:
            serve.get_replica_context()
        except RayServeException:
            return False
    target = logging.getLogger(SERVE_LOGGER)
    for package in PACKAGES:
        package_logger = logging.getLogger(package)
        if any(isinstance(h, _ToServeLogger) for h in package_logger.handlers):
            continue
        package_logger.addHandler(_ToServeLogger(target))
        package_logger.setLevel(logging.INFO)
        package_logger.propagate = False
    return True
