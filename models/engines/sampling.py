"""Choosing the next token: sampling parameters, and the per-sequence sampler that plugs into
transformers' continuous batching.

transformers' continuous batching takes one ``do_sample`` and one seed for every sequence in
the batch. Loom's requests each bring their own temperature, top_p and seed, and greedy ones
must equal ``generate(do_sample=False)``. So the batch runs greedy (argmax), and
``SequenceSampler`` sits in its logits-processor slot: for each row that belongs to a sampled
sequence it draws the token with that sequence's own seeded generator and leaves only that
token standing, so the argmax picks it. Greedy rows pass through untouched.

    sampler = SequenceSampler()
    slot = sampler.add(SamplingParams(temperature=0.8, top_p=0.9, seed=7))
    ...  # the batch's rows carry their sequence's slot (prepare_tensor_args)
    sampler.remove(slot)

A fault in one sequence's sampling (logits the model made non-finite, say) fails that
sequence alone: the sampler records it against the slot (``failure``), leaves the row to the
argmax, and the engine ends that sequence with an error. An exception that escaped
``__call__`` would end transformers' generation loop for every sequence on the engine.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
)
from transformers.generation.continuous_batching.requests import FutureRequestState

logger = logging.getLogger(__name__)

GREEDY_SLOT = -1
"""The slot of a sequence the sampler leaves to the batch's argmax."""

MIN_SAMPLING_TEMPERATURE = 1e-5
"""Temperatures below this are greedy (argmax), as vLLM's: at 1e-5 a logit gap of 0.001
already weighs e^-100 against the top token, so sampling could only differ on exact ties,
and a smaller divisor buys nothing but overflow (1e-300 is 0.0 in float32: x / 0 is inf)."""

SEED_MIN = -(2**63)
SEED_MAX = 2**63 - 1
"""Seeds are int64, what ``torch.Generator.manual_seed`` takes (it refuses 2**64 and up)."""


class SamplingError(ValueError):
    """One sequence's next token could not be drawn (its logits hold no finite maximum)."""


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_tokens: int = 16
    """Most new tokens to generate."""
    temperature: float = 1.0
    """Below ``MIN_SAMPLING_TEMPERATURE`` (0 included) greedy (argmax); else it divides the
    logits before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    stop: tuple[str, ...] = ()
    """Generation ends before the first of these strings; it is not part of the text."""
    seed: int | None = None
    """Makes sampling repeatable; int64 (``SEED_MIN`` to ``SEED_MAX``)."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (benchmarks want exact lengths)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, not {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be an int64 ({SEED_MIN} to {SEED_MAX}), not {self.seed}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_SAMPLING_TEMPERATURE


def sample_seed(seed: int, sample: int) -> int:
    """The seed of a request's ``sample``-th choice: ``seed + sample``, wrapped to stay an
    int64, so the n samples differ, repeatably, even from ``SEED_MAX`` (which wraps to
    ``SEED_MIN``)."""
    return (seed + sample - SEED_MIN) % 2**64 + SEED_MIN


def pick_next_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """The next token from one position's logits (V,): argmax, or a top-p sample.

    In float64, the maximum subtracted before dividing by the temperature: every scaled
    logit is <= 0 and the top one exactly 0, so any finite temperature gives finite weights
    whose sum is at least 1 (a huge one gives a uniform draw). In float32 a gap of 6e38 is
    already -inf, and -inf / 1e300 (inf in float32) is NaN. ``SamplingError`` when the
    logits have no finite maximum (NaN or inf from the model)."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits.double()
    top = logits.max()
    if not torch.isfinite(top):
        raise SamplingError(f"the logits' maximum is {top.item()}, not a finite number")
    probs = torch.softmax((logits - top) / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep tokens until the mass before them reaches top_p: [0.5, 0.3, 0.2] at 0.7 -> 2
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class _Sampled:
    params: SamplingParams
    generator: torch.Generator
    failure: str | None = None
    """Why this sequence's sampling failed; it is sampled no more (the engine ends it)."""


class SequenceSampler(ContinuousBatchingLogitsProcessor):
    """Per-sequence sampling inside a continuous batch (see the module docstring).

    Rows find their sequence through a small integer slot that ``prepare_tensor_args`` writes
    into the batch's argument tensor, so the mapping travels with the batch (it stays right
    when transformers prepares the next batch before this one's logits are processed).
    """

    supported_kwargs: dict[str, type] = {"loom_slot": int}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sampled: dict[int, _Sampled] = {}
        self._next_slot = 0

    def add(self, params: SamplingParams, device: torch.device | str = "cpu") -> int:
        """The slot for a new sequence; greedy ones need none."""
        if params.greedy:
            return GREEDY_SLOT
        generator = torch.Generator(device=device)
        if params.seed is not None:
            generator.manual_seed(params.seed)
        else:
            generator.seed()
        with self._lock:
            slot = self._next_slot
            self._next_slot = (self._next_slot + 1) % (1 << 30)
            self._sampled[slot] = _Sampled(params, generator)
        return slot

    def remove(self, slot: int) -> None:
        with self._lock:
            self._sampled.pop(slot, None)

    def failure(self, slot: int) -> str | None:
        """Why sampling failed for the sequence in ``slot``; None while it is fine."""
        if slot == GREEDY_SLOT:
            return None
        with self._lock:
            entry = self._sampled.get(slot)
        return None if entry is None else entry.failure

    # ---- the continuous-batching processor interface (called on the engine's thread) ----

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(GREEDY_SLOT)

    def prepare_tensor_args(
        self, requests_with_new_token: list[FutureRequestState]
    ) -> torch.Tensor:
        slots = [
            r.state.logit_processor_kwargs.get("loom_slot", GREEDY_SLOT)
            for r in requests_with_new_token
        ]
        return torch.tensor(slots, dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        # scores: (rows, V) in fp32; tensor_arg[:rows] holds each row's slot
        slots = tensor_arg[: scores.shape[0]].tolist()
        if all(s == GREEDY_SLOT for s in slots):
            return scores
        with self._lock:
            sampled = {s: self._sampled.get(s) for s in slots if s != GREEDY_SLOT}
        for row, slot in enumerate(slots):
            entry = sampled.get(slot)
            if entry is None or entry.failure is not None:
                continue
            try:
                token = pick_next_token(scores[row], entry.params, entry.generator)
            except Exception as exc:  # this sequence's fault: the batch and the loop go on
                logger.warning("sampling failed for slot %d: %r", slot, exc)
                entry.failure = f"sampling failed: {exc}"
                continue  # the argmax picks its token; the engine ends the sequence
            scores[row].fill_(float("-inf"))
            scores[row, token] = 0.0  # the batch's argmax now picks exactly this token
        return scores
