"""Fault injection: make a model's replicas slow or failing on purpose, per call.

An operator feature, like Envoy's or Istio's fault injection: to see what an ensemble's
deadline, quorum and hedging do when a member straggles or fails, to rehearse an incident,
or to benchmark tail latency. A model config with ``faults:`` applies them inside each of
its replicas (``serving.model_server.ModelReplica``), call by call:

- a *delayed* call waits ``delay_ms`` before it joins the batcher. With ``delay_scope:
  call`` (the default) only that call waits, as behind a slow network path or a lost packet,
  and cancelling the call (a hedge won) ends its wait; with ``replica`` the wait holds the
  replica's engine thread, a stalled replica: whatever queues behind it waits too;
- an *erroring* call raises ``InjectedFault`` before it is admitted; the gateway answers 503
  in the protocol's shape.

    faults:
      delay_ms: 200
      delay_probability: 0.05   # 1 call in 20 holds the replica 200 ms
      error_probability: 0.0

Each replica draws from its own RNG (seeded with ``seed`` plus its process id, so two
replicas do not straggle in lockstep).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class FaultsConfig(BaseModel):
    """Faults a model's replicas inject into their own calls."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    delay_ms: float = Field(0.0, ge=0, le=600_000, description="How long a delayed call waits.")
    delay_scope: Literal["call", "replica"] = Field(
        "call",
        description="call: only the delayed call waits (a slow request); replica: the wait "
        "holds the replica's engine thread, so every call queued behind it waits too.",
    )
    delay_probability: float = Field(
        0.0, ge=0, le=1, description="Share of calls delayed by delay_ms (0..1)."
    )
    error_probability: float = Field(
        0.0, ge=0, le=1, description="Share of calls that fail with a 503 instead (0..1)."
    )
    seed: int = Field(0, ge=0, description="Seeds each replica's draws (with its process id).")


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


class InjectedFault(Exception):
    """A call failed on purpose (``faults.error_probability``); the gateway answers 503."""

    def __init__(self, model: str) -> None:
        super().__init__(f"model {model} failed the call (injected fault)")
        self.model = model

    def __reduce__(self):  # survives the hop back through Ray
        return (InjectedFault, (self.model,))
