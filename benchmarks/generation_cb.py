"""transformers' own continuous batching, in this process: the engine the stack wraps, without
the stack (no HTTP, no Ray, no Loom sampler or detokeniser), driven like the stack.

``model.init_continuous_batching`` builds a ``ContinuousBatchingManager`` (paged KV cache,
iteration-level scheduling on one background thread); ``add_request`` queues one prompt with
its own ``max_new_tokens`` and ``eos_token_id``, ``get_result`` hands back each request once it
has finished. c closed-loop clients each keep one request in flight: a client sends its next
request as soon as its previous one is handed back, until the window closes; the requests
still running then are read to their end, so tokens are counted by overlap with the window,
as for the stack (``generation_report.window_figures``).

- Every request makes exactly its own ``max_tokens``: ``max_new_tokens`` is per request, and
  ``eos_token_id=-1`` turns end-of-sequence off for it (the manager keeps no id below 0).
- Greedy: ``GenerationConfig(do_sample=False)``; greedy output equals ``generate``'s (tested).
- TTFT: sent (before tokenising the prompt) to the first new token, stamped on the manager's
  thread when that token is known (``record_timestamps=True``), as ``generate``'s streamer hook
  stamps it for the sequential and static baselines; the end is when this thread gets the
  result back.
- Limits as the stack's engine sets them (``cb_settings``): pages of 64 tokens, a KV cache with
  room for every client's full context, 1024 tokens per step, as many sequences per step as
  clients; prefix sharing off. Left to itself the manager sizes its cache from free memory
  (60% of RAM on a CPU).

    settings = cb_settings(max_concurrency=32, context_tokens=512, attention="sdpa")
    with TransformersCbEngine.start(model, tokenizer, settings) as engine:
        result = run_closed_loop(engine, requests, concurrency=8, warmup_s=3, duration_s=6)
    figures = window_figures(result.timings, result.window_start_ns, result.window_end_ns)
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from benchmarks.generation_model import GenerationRequest
from benchmarks.generation_report import NS_PER_S, RequestTiming, closed_loop_offsets

CB_API = (
    "model.init_continuous_batching(generation_config, continuous_batching_config) -> "
    "ContinuousBatchingManager; start(); add_request(input_ids, max_new_tokens=, "
    "eos_token_id=-1, record_timestamps=True); get_result(timeout=); stop()"
)


@dataclass(frozen=True, kw_only=True)
class CbSettings:
    """How the manager is built: the limits the stack's generation engine gives it."""

    attention: str = "sdpa"
    """Attention implementation set on the model for the run; on a CPU, ``sdpa`` (what the
    model loads with: one masked call over the step's tokens and their pages) and ``eager``
    (the manager runs it as ``paged|eager``) both work, at about the same rate on the
    benchmark's GPT-2 (2 busy cores, c=8 and 32: within 15%, either ahead)."""
    max_sequences: int = 32
    """Most requests in one step (``max_requests_per_batch``)."""
    max_batch_tokens: int = 1024
    """Most tokens in one step: prompt chunks plus one per decoding request."""
    page_tokens: int = 64
    """Tokens per page of the paged KV cache (``page_size``)."""
    kv_cache_tokens: int = 32 * 512
    """KV cache size in tokens."""

    def __post_init__(self) -> None:
        if min(self.max_sequences, self.max_batch_tokens, self.page_tokens) < 1:
            raise ValueError("max_sequences, max_batch_tokens and page_tokens must be >= 1")
        if self.kv_cache_tokens < self.page_tokens:
            raise ValueError("kv_cache_tokens must hold at least one page")

    @property
    def kv_cache_pages(self) -> int:
        """``num_blocks``: 16384 tokens / 64 per page = 256."""
        return math.ceil(self.kv_cache_tokens / self.page_tokens)


def cb_settings(*, max_concurrency: int, context_tokens: int, attention: str) -> CbSettings:
    """The stack engine's limits for ``max_concurrency`` clients: a sequence per client in
    every step, a cache with room for each one's full context (32 x 512 = 16384 tokens), at
    least 1024 tokens per step (and one per client)."""
    if max_concurrency < 1 or context_tokens < 1:
        raise ValueError(f"need >= 1 client and context token, got {max_concurrency}, "
                         f"{context_tokens}")  # fmt: skip
    return CbSettings(
        attention=attention,
        max_sequences=max_concurrency,
        max_batch_tokens=max(1024, max_concurrency),
        kv_cache_tokens=max_concurrency * context_tokens,
    )


@dataclass(frozen=True, kw_only=True)
class FinishedRequest:
    """A request the engine has handed back."""

    request_id: str
    first_token_ns: int | None
    """When its first new token was known (``perf_counter_ns``); ``None`` if it made none."""
    tokens: int
    token_ids: tuple[int, ...] = ()
    """The new tokens."""
    error: str | None = None


class CbEngine(Protocol):
    """What the closed loop needs of an engine."""

    def submit(self, request: GenerationRequest) -> str:
        """Queue ``request`` to make exactly its ``max_tokens``, greedily; returns its id."""
        ...

    def next_finished(self, timeout_s: float) -> FinishedRequest | None:
        """The next request to finish, waiting up to ``timeout_s``; ``None`` if none did."""
        ...


@dataclass(kw_only=True)
class ClosedLoopResult:
    """Every request that ended well (warm-up and drain included: the report picks by time),
    and the failures inside the window: the same account as the stack's HTTP client keeps."""

    concurrency: int
    window_start_ns: int
    window_end_ns: int
    timings: list[RequestTiming] = field(default_factory=list)
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    short: int = 0
    """Requests sent in the window that made fewer tokens than their own ``max_tokens``."""


@dataclass(frozen=True)
class _InFlight:
    client: int
    request: GenerationRequest
    sent_ns: int


def run_closed_loop(
    engine: CbEngine,
    requests: Sequence[GenerationRequest],
    *,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    drain_timeout_s: float = 120.0,
    poll_s: float = 0.5,
    clock: Callable[[], int] = time.perf_counter_ns,
) -> ClosedLoopResult:
    """``concurrency`` clients, each with one request in flight, cycling through ``requests``
    from ``closed_loop_offsets``: a client sends its next request when its last one comes
    back, until ``warmup_s + duration_s`` have passed; then the ones still running are
    waited for (``RuntimeError`` after ``drain_timeout_s``)."""
    if not requests or concurrency < 1:
        raise ValueError("need at least one request and one client")
    if warmup_s < 0 or duration_s <= 0:
        raise ValueError("warmup_s must be >= 0 and duration_s > 0")
    window_start_ns = clock() + round(warmup_s * NS_PER_S)
    window_end_ns = window_start_ns + round(duration_s * NS_PER_S)
    drain_deadline_ns = window_end_ns + round(drain_timeout_s * NS_PER_S)
    result = ClosedLoopResult(
        concurrency=concurrency, window_start_ns=window_start_ns, window_end_ns=window_end_ns
    )
    error_kinds: Counter[str] = Counter()
    next_index = closed_loop_offsets(len(requests), concurrency)
    in_flight: dict[str, _InFlight] = {}

    def send(client: int) -> None:
        request = requests[next_index[client] % len(requests)]
        next_index[client] += 1
        sent_ns = clock()
        in_flight[engine.submit(request)] = _InFlight(client, request, sent_ns)

    for client in range(concurrency):
        send(client)
    while in_flight:
        if clock() > drain_deadline_ns:
            raise RuntimeError(
                f"{len(in_flight)} requests still running {drain_timeout_s:g} s after the "
                f"window closed"
            )
        finished = engine.next_finished(poll_s)
        if finished is None:
            continue
        done_ns = clock()
        sent = in_flight.pop(finished.request_id, None)
        if sent is None:
            continue  # not one of this loop's
        if finished.error is not None or finished.first_token_ns is None:
            if window_start_ns <= done_ns <= window_end_ns:
                result.errors += 1
                error_kinds[(finished.error or "no tokens")[:80]] += 1
        else:
            result.timings.append(
                RequestTiming(
                    sent_ns=sent.sent_ns,
                    first_token_ns=finished.first_token_ns,
                    done_ns=done_ns,
                    tokens=finished.tokens,
                )
            )
            sent_inside = window_start_ns <= sent.sent_ns < window_end_ns
            if sent_inside and finished.tokens < sent.request.max_tokens:
                result.short += 1
        if done_ns < window_end_ns:
            send(sent.client)
    result.error_kinds = dict(error_kinds)
    return result


class TransformersCbEngine:
    """A ``ContinuousBatchingManager`` on a loaded model, as a ``CbEngine``; started by
    ``start``, stopped (and the model's attention put back) by ``close``.

        with TransformersCbEngine.start(model, tokenizer, CbSettings()) as engine:
            request_id = engine.submit(GenerationRequest("Once upon", 16))
            finished = engine.next_finished(timeout_s=5.0)
    """

    def __init__(self, manager: Any, model: Any, tokenizer: Any, attention_before: str) -> None:
        self._manager = manager
        self._model = model
        self._tokenizer = tokenizer
        self._attention_before = attention_before

    @classmethod
    def start(cls, model: Any, tokenizer: Any, settings: CbSettings) -> TransformersCbEngine:
        """Set ``settings.attention`` on ``model``, build the manager and start its thread.
        ``RuntimeError`` where this transformers has no ``init_continuous_batching``."""
        import torch
        from transformers import GenerationConfig

        if not hasattr(model, "init_continuous_batching"):
            import transformers

            raise RuntimeError(
                f"transformers {transformers.__version__} has no "
                f"{type(model).__name__}.init_continuous_batching"
            )
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        attention_before = model.config._attn_implementation
        model.set_attn_implementation(settings.attention)
        try:
            manager = model.init_continuous_batching(
                generation_config=GenerationConfig(
                    do_sample=False,
                    max_new_tokens=16,  # each request gives its own
                    eos_token_id=-1,  # and -1: no end-of-sequence token
                    pad_token_id=tokenizer.pad_token_id,
                ),
                continuous_batching_config=ContinuousBatchingConfig(
                    page_size=settings.page_tokens,
                    num_blocks=settings.kv_cache_pages,
                    max_batch_tokens=settings.max_batch_tokens,
                    max_requests_per_batch=settings.max_sequences,
                    allow_block_sharing=False,
                ),
            )
            with torch.inference_mode():  # the manager's thread takes the caller's mode
                manager.start()
        except BaseException:
            model.set_attn_implementation(attention_before)
            raise
        return cls(manager, model, tokenizer, attention_before)

    @property
    def attention(self) -> str:
        """The attention implementation the manager runs (it may have changed the one set)."""
        return str(self._model.config._attn_implementation)

    def submit(self, request: GenerationRequest) -> str:
        ids = self._tokenizer(request.prompt)["input_ids"]
        request_id = self._manager.add_request(
            ids, max_new_tokens=request.max_tokens, eos_token_id=-1, record_timestamps=True
        )
        if request_id is None:
            raise RuntimeError("the continuous batching manager refused a request")
        return str(request_id)

    def next_finished(self, timeout_s: float) -> FinishedRequest | None:
        output = self._manager.get_result(timeout=timeout_s)
        if output is None:
            fatal = getattr(self._manager.background_thread_status, "fatal_error", None)
            if fatal is not None or not self._manager.is_running():
                raise RuntimeError(f"the continuous batching loop has stopped: {fatal}")
            return None
        if not output.is_finished():
            return None  # a streamed step; requests here are not streamed
        stamps = output.timestamps or ()
        return FinishedRequest(
            request_id=output.request_id,
            # perf_counter seconds, the clock perf_counter_ns counts in nanoseconds
            first_token_ns=round(stamps[0] * NS_PER_S) if stamps else None,
            tokens=len(output.generated_tokens),
            token_ids=tuple(output.generated_tokens),
            error=output.error,
        )

    def close(self) -> None:
        """Stop the manager's thread (requests still queued are finished first) and put the
        model's attention implementation back."""
        try:
            self._manager.stop(block=True, timeout=30)
        finally:
            self._model.set_attn_implementation(self._attention_before)

    def __enter__(self) -> TransformersCbEngine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
