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
from collections.abc import Callable
from dataclasses import dataclass, field

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

MAX_LOGPROBS = 20
"""Most alternatives a sequence may ask for at each position (OpenAI's limit for
``top_logprobs``; its legacy ``logprobs`` allowed 5, vLLM 20)."""


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """One position's log-probabilities, as token ids: the token there, its logprob, and the
    ``top`` alternatives (most likely first; as many as the sequence asked for)."""

    token_id: int
    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


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
    logprobs: int | None = None
    """Report each generated token's logprob and this many alternatives (0 to
    ``MAX_LOGPROBS``); None: none. Of the distribution the token was drawn from: the logits
    divided by the temperature (greedy: as they are), before top-p."""
    prompt_logprobs: int | None = None
    """Report each prompt token's logprob given the tokens before it (the first has none),
    with this many alternatives; None: none. Computed in the prefill, from the model's logits
    as they are."""

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be at least 0, not {self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be 0 to {MAX_LOGPROBS}, not {value}")
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

    @property
    def scale(self) -> float:
        """What the logits are divided by before the draw (1 when greedy)."""
        return 1.0 if self.greedy else self.temperature


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
    generator: torch.Generator | None
    """None for a greedy sequence (it has a slot only for its logprobs)."""
    failure: str | None = None
    """Why this sequence's sampling failed; it is sampled no more (the engine ends it)."""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    """One per generated token, in order, when the sequence asked for logprobs."""


def record_logprobs(
    scores: torch.Tensor, rows: list[tuple[int, _Sampled]]
) -> Callable[[int, _Sampled, int], None]:
    """Log-softmax the rows that asked for logprobs, in one call, before anything changes
    their scores; returns ``record(row, entry, token)``, which keeps the token's logprob and
    the entry's top alternatives once the token is known."""
    index = {row: i for i, (row, _) in enumerate(rows)}
    scale = torch.tensor([entry.params.scale for _, entry in rows], dtype=scores.dtype)
    logps = torch.log_softmax(scores[[row for row, _ in rows]] / scale[:, None], dim=-1)
    k = max(entry.params.logprobs or 0 for _, entry in rows)
    top_values, top_ids = torch.topk(logps, k, dim=-1) if k else (None, None)

    def record(row: int, entry: _Sampled, token: int) -> None:
        i = index[row]
        n = entry.params.logprobs or 0
        entry.logprobs.append(
            TokenLogprobs(
                token,
                float(logps[i, token]),
                tuple(top_ids[i, :n].tolist()) if top_ids is not None and n else (),
                tuple(top_values[i, :n].tolist()) if top_values is not None and n else (),
            )
        )

    return record


class SequenceSampler(ContinuousBatchingLogitsProcessor):
    """Per-sequence sampling inside a continuous batch (see the module docstring).

    Rows find their sequence through a small integer slot that ``prepare_tensor_args`` writes
    into the batch's argument tensor, so the mapping travels with the batch (it stays right
    when transformers prepares the next batch before this one's logits are processed).

    A sequence that asks for logprobs gets a slot even when greedy: its row is log-softmaxed
    (divided by its temperature first) and its token's logprob and top alternatives kept
    (``logprobs``); a greedy row's token is the argmax the batch will pick. Batches of
    sequences that asked for neither sampling nor logprobs take the first return below, as
    before: they pay nothing for the feature.
    """

    supported_kwargs: dict[str, type] = {"loom_slot": int}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sampled: dict[int, _Sampled] = {}
        self._next_slot = 0

    def add(self, params: SamplingParams, device: torch.device | str = "cpu") -> int:
        """The slot for a new sequence; greedy ones that want no logprobs need none."""
        if params.greedy and params.logprobs is None:
            return GREEDY_SLOT
        generator = None
        if not params.greedy:
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

    def logprobs(self, slot: int, start: int, end: int) -> tuple[TokenLogprobs, ...]:
        """The logprobs of generated tokens ``start`` to ``end`` of the sequence in ``slot``
        (empty when it asked for none)."""
        if slot == GREEDY_SLOT:
            return ()
        with self._lock:
            entry = self._sampled.get(slot)
        return () if entry is None else tuple(entry.logprobs[start:end])

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
        rows = [
            (row, entry)
            for row, slot in enumerate(slots)
            if (entry := sampled.get(slot)) is not None and entry.failure is None
        ]
        wanting = [(row, entry) for row, entry in rows if entry.params.logprobs is not None]
        record = None
        if wanting:
            try:
                record = record_logprobs(scores, wanting)
            except Exception as exc:  # their fault alone (non-finite logits, say)
                logger.warning("logprobs failed for %d sequences: %r", len(wanting), exc)
                for _, entry in wanting:
                    entry.failure = f"logprobs failed: {exc}"
        for row, entry in rows:
            if entry.failure is not None:
                continue
            try:
                if entry.generator is None:  # greedy, here for its logprobs
                    token = int(torch.argmax(scores[row]))
                else:
                    token = pick_next_token(scores[row], entry.params, entry.generator)
                if record is not None and entry.params.logprobs is not None:
                    record(row, entry, token)
            except Exception as exc:  # this sequence's fault: the batch and the loop go on
                logger.warning("sampling failed for slot %d: %r", slots[row], exc)
                entry.failure = f"sampling failed: {exc}"
                continue  # the argmax picks its token; the engine ends the sequence
            if entry.generator is not None:
                scores[row].fill_(float("-inf"))
                scores[row, token] = 0.0  # the batch's argmax now picks exactly this token
        return scores
