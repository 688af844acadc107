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
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
)
from transformers.generation.continuous_batching.requests import FutureRequestState

GREEDY_SLOT = -1
"""The slot of a sequence the sampler leaves to the batch's argmax."""


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_tokens: int = 16
    """Most new tokens to generate."""
    temperature: float = 1.0
    """0 means greedy (argmax); above 0 divides the logits before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    stop: tuple[str, ...] = ()
    """Generation ends before the first of these strings; it is not part of the text."""
    seed: int | None = None
    """Makes sampling repeatable."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (benchmarks want exact lengths)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def pick_next_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """The next token from one position's logits (V,): argmax, or a top-p sample."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
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
            if entry is None:
                continue
            token = pick_next_token(scores[row], entry.params, entry.generator)
            scores[row].fill_(float("-inf"))
            scores[row, token] = 0.0  # the batch's argmax now picks exactly this token
        return scores
