"""Loom's autoscaling policy as a Ray Serve custom policy: the adapter between Serve's
``AutoscalingContext`` and the pure decision (``serving.autoscaling.policy.decide``).

Serve makes one ``LoomAutoscalingPolicy`` per deployment from the ``policy_kwargs`` the
deployment was given (``autoscaling_config`` below) and calls it on every control-loop tick
(10 a second) in its controller. A call takes the app's latest ``Reading`` from the process's
poller (``serving.autoscaling.pollers``: the sidecars, or Prometheus), turns it into the
model kind's signals, decides, and hands Serve the replica count and the window state to
give back next time. Serve's own delays are set to 0: the windows are ours. Each decision is
written beside the replicas' stats for the node's sidecar to export
(``loom_autoscaler_desired_replicas`` and the deciding signal) and logged when it changes.

This module is pickled by value into Serve's controller (Serve does that with a policy's
module), so it holds no module-level state: the pollers live in ``pollers``.

    options["autoscaling_config"] = autoscaling_config(entry, settings)   # a deployment's
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from ray.serve.config import AutoscalingContext, AutoscalingPolicy

from serving.autoscaling.policy import (
    HOLD,
    KV_CACHE_USE,
    LATENCY_P95,
    QUEUE_DEPTH,
    WAITING_SEQUENCES,
    Decision,
    Limits,
    Signal,
    WindowState,
    decide,
)
from serving.autoscaling.pollers import Source, poller_for
from serving.autoscaling.readings import Reading
from serving.config.sections import AutoscalingConfig
from serving.monitoring.stats import stats_path, write_atomically
from serving.replica_logging import route_to_serve_log

logger = logging.getLogger("serving.autoscaling")

STATE_KEY = "loom_window"
LOOK_BACK_S = 5.0
"""Serve's look-back window for requests at the handles (its default: 30 s)."""
EXPORT_EVERY_S = 5.0
"""A decision that did not change is written again this often (the sidecar drops older)."""


class ReadingSource(Protocol):
    def latest(self, app: str) -> Reading | None: ...


@dataclass(frozen=True)
class Targets:
    """What each signal aims for (from the entry's ``autoscaling`` section)."""

    queue_depth: float
    latency_slo_ms: float | None
    waiting_sequences: float
    kv_cache_use: float


def signals_from(
    reading: Reading | None, task: str, targets: Targets, current: int
) -> list[Signal]:
    """The model kind's signals from ``reading``, per replica where a sum was read: 24 queued
    over 3 replicas -> 8.0 against ``target_queue_depth``. A missing reading gives signals
    with nothing observed (the policy then never scales down)."""
    per = max(current, 1)
    at = reading.at_s if reading is not None else None

    def per_replica(total: float | None) -> float | None:
        return None if total is None else total / per

    queued = per_replica(reading.queue_depth if reading is not None else None)
    signals = [Signal(QUEUE_DEPTH, queued, targets.queue_depth, at)]
    if targets.latency_slo_ms is not None:
        latency = reading.latency_p95_ms if reading is not None else None
        signals.append(Signal(LATENCY_P95, latency, targets.latency_slo_ms, at))
    if task == "generate":
        waiting = per_replica(reading.waiting_sequences if reading is not None else None)
        kv = reading.kv_cache_use if reading is not None else None
        signals.append(Signal(WAITING_SEQUENCES, waiting, targets.waiting_sequences, at))
        signals.append(Signal(KV_CACHE_USE, kv, targets.kv_cache_use, at))
    return signals


class LoomAutoscalingPolicy:
    """One deployment's policy in Serve's controller (``policy_kwargs`` -> ``__init__``)."""

    def __init__(
        self,
        *,
        model: str,
        task: str,
        min_replicas: int,
        max_replicas: int,
        upscale_delay_s: float,
        downscale_delay_s: float,
        targets: dict[str, Any],
        source: dict[str, Any],
    ) -> None:
        self.model = model
        self.task = task
        self.limits = Limits(
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            upscale_delay_s=upscale_delay_s,
            downscale_delay_s=downscale_delay_s,
            # a reading older than a few polls is stale: the poller or its source is stuck
            stale_after_s=max(10.0, 5 * float(source.get("interval_s", 1.0))),
        )
        self.targets = Targets(**targets)
        self.source = Source(**source)
        self.readings: ReadingSource | None = None
        """Where readings come from: the process's poller for ``source`` unless set (a test,
        the benchmark: set on the instance, never by patching this module, which Serve
        pickles by value)."""
        self._last: tuple[int, str] | None = None
        self._exported_s = 0.0
        self._moved_by = ""
        """The signal behind the latest change of the count (what set the count now)."""
        route_to_serve_log(in_controller=True)  # decisions into the controller's log

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        app = ctx.app_name or ""
        readings = self.readings if self.readings is not None else poller_for(self.source)
        reading = readings.latest(app)
        current = ctx.target_num_replicas
        signals = signals_from(reading, self.task, self.targets, current)
        saved = ctx.policy_state.get(STATE_KEY)
        state = WindowState(**saved) if isinstance(saved, dict) else WindowState()
        decision = decide(
            current,
            signals,
            self.limits,
            state,
            now_s=time.time(),
            waiting_requests=int(ctx.total_num_requests) if current == 0 else 0,
        )
        if decision.desired == 0 and current > 0 and ctx.total_num_requests > 0:
            # Serve's handles still count requests (a mean over its look-back window): at
            # zero its cold start would bring a replica straight back; wait until they stop
            decision = replace(decision, desired=current, reason=HOLD)
        self._report(app, ctx, decision, signals)
        return decision.desired, {STATE_KEY: asdict(decision.state)}

    def _report(
        self, app: str, ctx: AutoscalingContext, decision: Decision, signals: list[Signal]
    ) -> None:
        """Log a change of the count; write the decision for the sidecar when it changed,
        and every ``EXPORT_EVERY_S`` besides."""
        now = time.monotonic()
        if decision.desired != ctx.target_num_replicas:
            self._moved_by = decision.reason
            observed = ", ".join(f"{s.name}={s.observed}" for s in signals)
            logger.info(
                "%s: %d -> %d replicas (%s; %s)",
                app,
                ctx.target_num_replicas,
                decision.desired,
                decision.reason,
                observed,
            )
        changed = self._last != (decision.desired, self._moved_by)
        if not changed and now - self._exported_s < EXPORT_EVERY_S:
            return
        self._last = (decision.desired, self._moved_by)
        self._exported_s = now
        version = app.rpartition("@")[2] if "@" in app else ""
        document = {
            "schema": 1,
            "kind": "autoscaler",
            "replica": f"autoscaler-{app}",
            "app": app,
            "written_s": time.time(),
            "models": [
                {
                    "model": self.model,
                    "version": version,
                    "gauges": {
                        "desired_replicas": decision.desired,
                        "current_replicas": ctx.current_num_replicas,
                    },
                    "signals": {s.name: s.observed for s in signals},
                    "deciding": self._moved_by,
                }
            ],
        }
        directory = Path(self.source.stats_dir)
        with contextlib.suppress(OSError):  # a decision unexported is still applied
            directory.mkdir(parents=True, exist_ok=True)
            write_atomically(stats_path(directory, f"autoscaler-{app}"), document)


def autoscaling_config(
    model: str, task: str, config: AutoscalingConfig, source: Source
) -> dict[str, Any]:
    """Serve's ``autoscaling_config`` for a deployment scaled by Loom's policy (or, with
    ``policy: serve``, by Serve's own on the same bounds, delays and target)."""
    if config.policy == "serve":
        return {
            "min_replicas": config.min_replicas,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_queue_depth,
            "upscale_delay_s": config.upscale_delay_s,
            "downscale_delay_s": config.downscale_delay_s,
        }
    targets = Targets(
        queue_depth=config.target_queue_depth,
        latency_slo_ms=config.latency_slo_ms,
        waiting_sequences=config.target_waiting_sequences,
        kv_cache_use=config.target_kv_cache_use,
    )
    policy = AutoscalingPolicy(
        policy_function=LoomAutoscalingPolicy,
        policy_kwargs={
            "model": model,
            "task": task,
            "min_replicas": config.min_replicas,
            "max_replicas": config.max_replicas,
            "upscale_delay_s": config.upscale_delay_s,
            "downscale_delay_s": config.downscale_delay_s,
            "targets": asdict(targets),
            "source": asdict(source),
        },
    )
    return {
        "min_replicas": config.min_replicas,
        "max_replicas": config.max_replicas,
        # from zero, one replica starts with the app (ready at once) and goes when idle
        "initial_replicas": 1 if config.min_replicas == 0 else None,
        # the stabilisation windows are the policy's own: Serve's would add to them
        "upscale_delay_s": 0.0,
        # how long Serve's handles remember a request: the policy goes to zero only once
        # they count none (their cold start would bring a replica straight back)
        "look_back_period_s": LOOK_BACK_S,
        "metrics_interval_s": LOOK_BACK_S / 5,  # Serve wants it below the look-back
        "downscale_delay_s": 0.0,
        "downscale_to_zero_delay_s": 0.0,
        "policy": policy,
    }
