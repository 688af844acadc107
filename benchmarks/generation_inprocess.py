"""The two baselines the stack is measured against, run in this process with transformers'
``model.generate``, greedy, ``min_new_tokens == max_new_tokens`` so every request makes
exactly N tokens:

- sequential: one request at a time. The requests run back to back once; each concurrency's
  figures are then replayed from the same timings (``generation_report.replay_closed_loop``):
  c clients arrive together, are served one after another in arrival order, and send again
  when answered, so a request's TTFT is its wait behind the c-1 ahead of it plus its own time
  to first token. A one-at-a-time server's service times do not depend on c, so one run
  serves every level.
- static batching: c clients' prompts left-padded into one ``generate`` call; all start
  together and all wait for the whole batch, so TTFT is the batch's time to first token.

The first token's time comes from a streamer hook (``FirstTokenClock``): ``generate`` hands
the streamer the prompt, then each step's new tokens (moved to the CPU, so a GPU is
synchronised by then).

    runner = InProcessGenerator.load(model_dir, threads=1)
    services = runner.sequential(prompts, max_new_tokens=64, count=40, warmup=2)
    batches = runner.static(prompts, max_new_tokens=64, batch_size=8, batches=4, warmup=1)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        """One ``generate`` call on ``prompts`` (padded together); (start, first token, done)
        on the ``perf_counter_ns`` clock, and the tokens generated in all."""
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
        new_tokens = (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]
        if clock.first_token_ns is None:
            raise RuntimeError("generate produced no tokens")
        return started_ns, clock.first_token_ns, done_ns, int(new_tokens)

    def sequential(
        self, prompts: Sequence[str], *, max_new_tokens: int, count: int, warmup: int
    ) -> list[RequestTiming]:
        """``warmup`` unmeasured requests, then ``count`` back to back, prompts in turn."""
        for i in range(warmup):
            self._generate([prompts[i % len(prompts)]], max_new_tokens)
        services = []
        for i in range(count):
            started, first, done, tokens = self._generate(
                [prompts[i % len(prompts)]], max_new_tokens
            )
            services.append(
                RequestTiming(sent_ns=started, first_token_ns=first, done_ns=done, tokens=tokens)
            )
        return services

    def static(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        batch_size: int,
        batches: int,
        warmup: int,
    ) -> list[BatchTiming]:
        """``warmup`` unmeasured batches, then ``batches`` of ``batch_size`` back to back;
        consecutive batches take consecutive prompts, so padding varies from batch to batch."""

        def batch_prompts(index: int) -> list[str]:
            start = index * batch_size
            return [prompts[(start + j) % len(prompts)] for j in range(batch_size)]

        for i in range(warmup):
            self._generate(batch_prompts(i), max_new_tokens)
        timings = []
        for i in range(batches):
            started, first, done, tokens = self._generate(batch_prompts(i), max_new_tokens)
            timings.append(
                BatchTiming(
                    started_ns=started,
                    first_token_ns=first,
                    done_ns=done,
                    size=batch_size,
                    tokens=tokens,
                )
            )
        return timings
