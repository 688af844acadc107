"""Fault injection: make a model's replicas slow or failing on purpose, per call.

An operator feature, like Envoy's or Istio's fault injection: to see what an ensemble's
deadline, quorum and hedging do when a member straggles or fails, to rehearse an incident,
or to benchmark tail latency. A model config with ``faults:`` applies them inside each of
its replicas (``serving.replicas.core.LoadedModel``), call by call:

- a *delayed* call waits ``delay_ms`` before it joins the batcher. With ``delay_scope:
  call`` (the default) only that call waits, as behind a slow network path or a lost packet,
  and cancelling the call (a hedge won) ends its wait; with ``replica`` the wait holds the
  replica's engine thread, a stalled replica: whatever queues behind it waits too;
- an *erroring* call raises ``messages.InjectedFault`` before it is admitted; the gateway
  answers 503 in the protocol's shape.

    faults:
      delay_ms: 200
      delay_probability: 0.05   # 1 call in 20 holds the replica 200 ms
      error_probability: 0.0

Each replica draws from its own RNG (seeded with ``seed`` plus its process id, so two
replicas do not straggle in lockstep).
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from serving.config.faults import FaultsConfig
from serving.messages import InjectedFault


@dataclass(frozen=True, slots=True)
class Fault:
    """What one call suffers: a delay (seconds, 0 for none) and/or an error."""

    delay_s: float = 0.0
    error: bool = False


NO_FAULT = Fault()


def fault_for(faults: FaultsConfig | None, *, delay_draw: float, error_draw: float) -> Fault:
    """The fault one call gets, from two uniform draws in [0, 1).

    A call errs when ``error_draw < error_probability`` and is delayed when
    ``delay_draw < delay_probability``: at 0.05, draws 0.00..0.0499 (5 in 100) delay.
    An erroring call is not delayed (it fails at once, as a crashed dependency would).
    """
    if faults is None:
        return NO_FAULT
    if error_draw < faults.error_probability:
        return Fault(error=True)
    if delay_draw < faults.delay_probability and faults.delay_ms > 0:
        return Fault(delay_s=faults.delay_ms / 1000.0)
    return NO_FAULT


class FaultInjector:
    """Applies one model's ``faults`` to each of its calls, in its replica."""

    def __init__(self, model: str, faults: FaultsConfig, runner: ThreadPoolExecutor) -> None:
        """``runner``: the engine thread a ``delay_scope: replica`` delay holds."""
        self._model = model
        self._faults = faults
        self._runner = runner
        self._rng = np.random.default_rng([faults.seed, os.getpid()])

    async def apply(self) -> None:
        """This call's fault: an error raises ``InjectedFault`` at once; a delay waits on this
        call alone (a cancelled call, a hedge won, stops waiting), or with ``delay_scope:
        replica`` holds the engine thread, so what queues behind it on this replica waits too."""
        delay_draw, error_draw = self._rng.random(2)
        fault = fault_for(self._faults, delay_draw=delay_draw, error_draw=error_draw)
        if fault.error:
            raise InjectedFault(self._model)
        if fault.delay_s <= 0:
            return
        if self._faults.delay_scope == "call":
            await asyncio.sleep(fault.delay_s)
        else:
            await asyncio.get_running_loop().run_in_executor(
                self._runner, time.sleep, fault.delay_s
            )
