"""The two baselines the stack is measured against, run in this process with transformers'
``model.generate``, greedy, ``min_new_tokens == max_new_tokens`` so every request makes
exactly its own ``max_tokens``:

- sequential: one request at a time. The requests run back to back once; each concurrency's
  figures are then replayed from the same timings (``generation_report.replay_closed_loop``):
  c clients arrive together, are served one after another in arrival order, and send again
  when answered, so a request's TTFT is its wait behind the c-1 ahead of it plus its own time
  to first token. A one-at-a-time server's service times do not depend on c, so one run
  serves every level.
- static batching: c clients' prompts left-padded into one ``generate`` call that runs to the
  longest request's ``max_tokens``, as a static-batching server must; all start together and
  all wait for the whole batch, so TTFT is the batch's time to first token. Only each
  request's own ``max_tokens`` count as useful tokens: a row whose request ended sooner is
  computed but wasted.

The first token's time comes from a streamer hook (``FirstTokenClock``): ``generate`` hands
the streamer the prompt, then each step's new tokens (moved to the CPU, so a GPU is
synchronised by then).

    runner = InProcessGenerator.load(model_dir, threads=1)
    services = runner.sequential(requests, count=40, warmup=2)   # GenerationRequest list
    batches = runner.static(requests, batch_size=8, batches=4, warmup=1)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.generation_model import GenerationRequest
from benchmarks.generation_report import BatchTiming, RequestTiming


class FirstTokenClock:
    """A ``generate`` streamer that notes when the first new tokens come out.

    ``generate`` calls ``put`` once with the prompt ids, then once per step with that step's
    tokens (one per sequence), then ``end``; the second ``put`` is the first token.
    """

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_ns: int | None = None

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_ns = time.perf_counter_ns()

    def end(self) -> None:
        pass


@dataclass
class InProcessGenerator:
    """A causal LM and its tokenizer, loaded the way the stack's engine loads them."""

    model: Any
    tokenizer: Any
    device: Any

    @classmethod
    def load(cls, model_dir: Path, *, threads: int, device: str = "auto") -> InProcessGenerator:
        """Load from ``model_dir`` (safetensors only) with ``threads`` intra-op threads."""
        import torch

        from models.device import resolve_device, resolve_dtype
        from models.loading import load_pretrained

        torch.set_num_threads(threads)
        resolved = resolve_device(device)
        loaded = load_pretrained(
            model_dir, task="generate", device=resolved, dtype=resolve_dtype("auto", resolved)
        )
        loaded.tokenizer.padding_side = "left"  # new tokens follow the prompt in every row
        return cls(model=loaded.model, tokenizer=loaded.tokenizer, device=resolved)

    def _generate(self, prompts: Sequence[str], max_new_tokens: int) -> tuple[int, int, int, int]:
        """One ``generate`` call on ``prompts`` (padded together) making ``max_new_tokens`` in
        every row; (start, first token, done) on the ``perf_counter_ns`` clock, and the new
        tokens per row."""
        import torch

        clock = FirstTokenClock()
        started_ns = time.perf_counter_ns()  # tokenising is part of serving a request too
        inputs = self.tokenizer(list(prompts), return_tensors="pt", padding=True).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                streamer=clock,
            )
        done_ns = time.perf_counter_ns()  # generate returns CPU-visible ids: synchronised
        steps = out.shape[1] - inputs["input_ids"].shape[1]
        if clock.first_token_ns is None:
            raise RuntimeError("generate produced no tokens")
        return started_ns, clock.first_token_ns, done_ns, int(steps)

    def sequential(
        self, requests: Sequence[GenerationRequest], *, count: int, warmup: int
    ) -> list[RequestTiming]:
        """``warmup`` unmeasured requests, then ``count`` back to back, requests in turn, each
        making its own ``max_tokens``."""
        for i in range(warmup):
            request = requests[i % len(requests)]
            self._generate([request.prompt], request.max_tokens)
        services = []
        for i in range(count):
            request = requests[i % len(requests)]
            started, first, done, steps = self._generate([request.prompt], request.max_tokens)
            services.append(
                RequestTiming(sent_ns=started, first_token_ns=first, done_ns=done, tokens=steps)
            )
        return services

    def static(
        self,
        requests: Sequence[GenerationRequest],
        *,
        batch_size: int,
        batches: int,
        warmup: int,
    ) -> list[BatchTiming]:
        """``warmup`` unmeasured batches, then ``batches`` of ``batch_size`` back to back;
        consecutive batches take consecutive requests, so padding and lengths vary from batch
        to batch. A batch runs to its longest request's ``max_tokens``; each request's own
        counts as useful (lengths 40 and 88: 88 steps, 176 computed, 128 useful)."""

        def batch_requests(index: int) -> list[GenerationRequest]:
            start = index * batch_size
            return [requests[(start + j) % len(requests)] for j in range(batch_size)]

        def run(batch: Sequence[GenerationRequest]) -> tuple[int, int, int, int]:
            longest = max(r.max_tokens for r in batch)
            return self._generate([r.prompt for r in batch], longest)

        for i in range(warmup):
            run(batch_requests(i))
        timings = []
        for i in range(batches):
            batch = batch_requests(i)
            started, first, done, steps = run(batch)
            timings.append(
                BatchTiming(
                    started_ns=started,
                    first_token_ns=first,
                    done_ns=done,
                    size=batch_size,
                    tokens=sum(min(r.max_tokens, steps) for r in batch),
                    computed_tokens=steps * batch_size,
                )
            )
        return timings
