"""Pure arithmetic of the generation benchmark: token rates, time to first token, the closed
loop replayed over a sequential server, where each closed-loop client starts in the request
list, the targets of issue 3, one-line text.

Every variant ends up as a ``LevelFigures`` (TTFT samples, tokens generated, the window they
came from), then as a ``GenerationLevel``; nothing here measures or reads anything.

    figures = window_figures(timings, window_start_ns, window_end_ns)      # the stack, cb
    figures = sequential_figures(services, concurrency=8)                 # model.generate
    figures = static_figures(batches)                                     # padded batches
    level = summarise_generation(concurrency=8, figures=figures, errors=0, short=0)
    print(format_generation_line("stack", level))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from benchmarks.report import Target, latency_ms
from benchmarks.result import ratio

NS_PER_S = 1_000_000_000


@dataclass(frozen=True, kw_only=True)
class RequestTiming:
    """One generation request, on the ``time.perf_counter_ns`` clock."""

    sent_ns: int
    """When the client sent it (for a replayed closed loop: when the client would have)."""
    first_token_ns: int
    """When the first non-empty text (or the first new token) arrived."""
    done_ns: int
    """When the last of it arrived."""
    tokens: int
    """Tokens generated (prompt not counted)."""

    @property
    def ttft_ns(self) -> int:
        return self.first_token_ns - self.sent_ns


@dataclass(frozen=True, kw_only=True)
class BatchTiming:
    """One static batch: every request in it starts at ``started_ns`` and ends at ``done_ns``."""

    started_ns: int
    first_token_ns: int
    """When the batch's first new tokens (one per request) came out."""
    done_ns: int
    size: int
    """Requests in the batch."""
    tokens: int
    """Useful tokens: each request's own ``max_tokens``, summed."""
    computed_tokens: int
    """Tokens the batch computed: ``size`` x the steps it ran (its longest request's
    ``max_tokens``); a request that ended sooner idles in its row until the batch ends."""


@dataclass(frozen=True, kw_only=True)
class LevelFigures:
    """What one variant measured at one concurrency, before percentiles."""

    ttft_ns: tuple[int, ...]
    """One TTFT per measured request."""
    tokens: float
    """Tokens generated inside the window (fractional where a request straddles its edge)."""
    duration_s: float
    requests: int
    """Requests measured (their TTFTs are in ``ttft_ns``)."""


def tokens_in_window(timings: Sequence[RequestTiming], start_ns: int, end_ns: int) -> float:
    """Tokens generated inside [start_ns, end_ns], each request's tokens spread evenly from its
    first token to its end (a stream of 64 tokens from t=1 s to t=3 s, window [2 s, 10 s]:
    half of it, 32 tokens). Counting by overlap rather than by whole requests keeps a 10 s
    window honest when one request takes 3 s: no rounding to whole requests at either edge.
    """
    if end_ns <= start_ns:
        raise ValueError("the window must end after it starts")
    total = 0.0
    for timing in timings:
        span = timing.done_ns - timing.first_token_ns
        if span <= 0:  # one token, or all at once: counted where it landed
            total += timing.tokens if start_ns <= timing.done_ns <= end_ns else 0
            continue
        overlap = min(end_ns, timing.done_ns) - max(start_ns, timing.first_token_ns)
        total += timing.tokens * max(0, overlap) / span
    return total


def window_figures(timings: Sequence[RequestTiming], start_ns: int, end_ns: int) -> LevelFigures:
    """A closed loop driven for real (the stack): tokens by overlap with the window; TTFT of
    the requests sent inside it (those sent during warm-up met a loop still filling up)."""
    sent_inside = [t for t in timings if start_ns <= t.sent_ns < end_ns]
    return LevelFigures(
        ttft_ns=tuple(t.ttft_ns for t in sent_inside),
        tokens=tokens_in_window(timings, start_ns, end_ns),
        duration_s=(end_ns - start_ns) / NS_PER_S,
        requests=len(sent_inside),
    )


def closed_loop_offsets(request_count: int, concurrency: int) -> list[int]:
    """Where in the request list each of ``concurrency`` closed-loop clients starts, so that
    concurrent requests carry different lengths: 64 requests, 8 clients -> 0, 8, 16, ..., 56;
    64 requests, 128 clients -> 0, 1, 2, ... (a stride of at least 1; indices past the list
    wrap round when used)."""
    if request_count < 1 or concurrency < 1:
        raise ValueError(f"need >= 1 request and client, got {request_count}, {concurrency}")
    stride = max(1, request_count // concurrency)
    return [client * stride for client in range(concurrency)]


def replay_closed_loop(services: Sequence[RequestTiming], concurrency: int) -> list[RequestTiming]:
    """The requests a one-at-a-time server ran back to back, as ``concurrency`` closed-loop
    clients would have seen them: all clients send at the first request's start; each sends
    again when its answer ends, and the server takes requests in arrival order.

    So request k arrives when request k - c ends (the first c at the start) and waits for the
    ones ahead of it: with c=8 and 0.5 s each, a request in steady state waits 7 x 0.5 = 3.5 s
    before its own prefill. Returns copies with ``sent_ns`` set to the arrival time.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if not services:
        return []
    start_ns = services[0].sent_ns
    replayed = []
    for k, service in enumerate(services):
        arrival_ns = services[k - concurrency].done_ns if k >= concurrency else start_ns
        replayed.append(
            RequestTiming(
                sent_ns=arrival_ns,
                first_token_ns=service.first_token_ns,
                done_ns=service.done_ns,
                tokens=service.tokens,
            )
        )
    return replayed


def sequential_figures(services: Sequence[RequestTiming], concurrency: int) -> LevelFigures:
    """TTFT from the replayed closed loop in steady state: the first ``concurrency`` requests
    (all sent at once at the start, so queued behind a partial round) are its warm-up; the rest
    are measured. Tokens/s from the whole run: a one-at-a-time server makes tokens at the same
    rate whatever the number of clients waiting, so every level shares one rate (more
    requests, less noise). Needs more than ``concurrency`` services.
    """
    if len(services) <= concurrency:
        raise ValueError(
            f"{len(services)} sequential requests cannot show concurrency {concurrency} in "
            f"steady state; run more than {concurrency}"
        )
    measured = replay_closed_loop(services, concurrency)[concurrency:]
    return LevelFigures(
        ttft_ns=tuple(t.ttft_ns for t in measured),
        tokens=float(sum(t.tokens for t in services)),
        duration_s=(services[-1].done_ns - services[0].sent_ns) / NS_PER_S,
        requests=len(measured),
    )


def static_figures(batches: Sequence[BatchTiming]) -> LevelFigures:
    """Batches run back to back, each filled by the c clients that the previous one released:
    every request's TTFT is its batch's time to first token; tokens/s is the useful tokens
    (each request's own length, not the rows idling until the longest ends) over the batches'
    summed run time."""
    if not batches:
        raise ValueError("no batches measured")
    ttft = tuple(b.first_token_ns - b.started_ns for b in batches for _ in range(b.size))
    return LevelFigures(
        ttft_ns=ttft,
        tokens=float(sum(b.tokens for b in batches)),
        duration_s=sum(b.done_ns - b.started_ns for b in batches) / NS_PER_S,
        requests=len(ttft),
    )


def useful_token_share(batches: Sequence[BatchTiming]) -> float:
    """Useful tokens over computed ones: a batch of lengths 40 and 88 runs 88 steps in both
    rows, (40 + 88) / (2 x 88) = 0.73; 1.0 when every request has the same length."""
    computed = sum(b.computed_tokens for b in batches)
    if computed <= 0:
        raise ValueError("no tokens computed")
    return sum(b.tokens for b in batches) / computed


@dataclass(frozen=True, kw_only=True)
class GenerationLevel:
    """One variant at one concurrency, as printed and written to the JSON."""

    concurrency: int
    tokens_per_s: float
    """Generated tokens per second of the measured window, all requests together."""
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    ttft_p99_ms: float | None
    requests: int
    """Requests whose TTFT was measured."""
    duration_s: float
    errors: int = 0
    short: int = 0
    """Requests that ended with fewer tokens than asked for (ignore_eos not honoured?)."""
    loadgen_cpu_share: float | None = None
    """HTTP client's CPU seconds per second of window (1.0 = one core); in-process: ``None``."""


def summarise_generation(
    *,
    concurrency: int,
    figures: LevelFigures,
    errors: int = 0,
    short: int = 0,
    loadgen_cpu_s: float | None = None,
) -> GenerationLevel:
    """Rates and TTFT percentiles: 6400 tokens in a 10 s window -> 640 tokens/s."""
    if figures.duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {figures.duration_s}")
    ttft = latency_ms(figures.ttft_ns)
    return GenerationLevel(
        concurrency=concurrency,
        tokens_per_s=figures.tokens / figures.duration_s,
        ttft_p50_ms=ttft.p50_ms,
        ttft_p95_ms=ttft.p95_ms,
        ttft_p99_ms=ttft.p99_ms,
        requests=figures.requests,
        duration_s=figures.duration_s,
        errors=errors,
        short=short,
        loadgen_cpu_share=None if loadgen_cpu_s is None else loadgen_cpu_s / figures.duration_s,
    )


@dataclass(frozen=True, kw_only=True)
class GenerationGoals:
    """Issue 3's targets for continuous batching in the stack."""

    min_stack_over_sequential: float = 4.0
    """Stack tokens/s at ``high_concurrency`` / sequential ``model.generate`` tokens/s there."""
    high_concurrency: int = 32
    max_ttft_growth: float = 2.0
    """Stack TTFT p50 at ``busy_concurrency`` / stack TTFT p50 at ``idle_concurrency``."""
    busy_concurrency: int = 8
    idle_concurrency: int = 1
    min_stack_share_of_cb: float = 0.8
    """Stack tokens/s / transformers' own continuous batching in-process (``cb``) tokens/s, at
    the highest concurrency both ran: what the stack keeps of the engine it wraps."""


def _at(levels: Sequence[GenerationLevel], concurrency: int) -> GenerationLevel | None:
    return next((level for level in levels if level.concurrency == concurrency), None)


def highest_common_concurrency(
    first: Sequence[GenerationLevel], second: Sequence[GenerationLevel]
) -> int | None:
    """The highest concurrency measured in both: levels 1, 8, 32 and 1, 8 -> 8; ``None`` when
    they share none."""
    common = {level.concurrency for level in first} & {level.concurrency for level in second}
    return max(common, default=None)


def evaluate_generation_targets(
    levels: Mapping[str, Sequence[GenerationLevel]], goals: GenerationGoals | None = None
) -> list[Target]:
    """The three targets from ``levels`` by variant (``stack``, ``sequential``, ``cb``);
    ``N/A`` where a level is missing. Stack 900 tokens/s at c=32 over sequential 200 -> 4.5
    (PASS); stack TTFT p50 60 ms at c=8 over 25 ms at c=1 -> 2.4 (MISS); stack 900 tokens/s
    over cb 1000 at c=32, the highest level both ran -> 0.9 (PASS)."""
    goals = goals or GenerationGoals()
    stack, sequential = levels.get("stack", ()), levels.get("sequential", ())
    cb = levels.get("cb", ())
    hi, busy, idle = goals.high_concurrency, goals.busy_concurrency, goals.idle_concurrency
    stack_hi, sequential_hi = _at(stack, hi), _at(sequential, hi)
    stack_busy, stack_idle = _at(stack, busy), _at(stack, idle)
    common = highest_common_concurrency(stack, cb)
    stack_common = _at(stack, common) if common is not None else None
    cb_common = _at(cb, common) if common is not None else None
    return [
        Target(
            name="stack_over_sequential",
            value=ratio(
                stack_hi.tokens_per_s if stack_hi else None,
                sequential_hi.tokens_per_s if sequential_hi else None,
            ),
            goal=goals.min_stack_over_sequential,
            higher_is_better=True,
            formula=f"stack tokens/s at c={hi} / sequential generate tokens/s at c={hi}",
        ),
        Target(
            name="stack_ttft_growth",
            value=ratio(
                stack_busy.ttft_p50_ms if stack_busy else None,
                stack_idle.ttft_p50_ms if stack_idle else None,
            ),
            goal=goals.max_ttft_growth,
            higher_is_better=False,
            formula=f"stack TTFT p50 at c={busy} / stack TTFT p50 at c={idle}",
        ),
        Target(
            name="stack_share_of_cb",
            value=ratio(
                stack_common.tokens_per_s if stack_common else None,
                cb_common.tokens_per_s if cb_common else None,
            ),
            goal=goals.min_stack_share_of_cb,
            higher_is_better=True,
            formula=f"stack tokens/s / transformers continuous batching in-process tokens/s "
            f"at c={'?' if common is None else common} (the highest concurrency both ran)",
        ),
    ]


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_generation_line(variant: str, level: GenerationLevel) -> str:
    """``stack      c=8  :    812.4 tokens/s  TTFT p50   31.20 ms  p95   48.90 ms  (96 requests, 0
    errors, 0 short)``, plus the client's CPU share for HTTP variants."""
    line = (
        f"{variant:<10} c={level.concurrency:<3}: {level.tokens_per_s:8.1f} tokens/s  "
        f"TTFT p50 {_fmt(level.ttft_p50_ms, '8.2f')} ms  p95 {_fmt(level.ttft_p95_ms, '8.2f')} ms"
        f"  ({level.requests} requests, {level.errors} errors, {level.short} short, "
        f"{level.duration_s:.1f} s)"
    )
    if level.loadgen_cpu_share is not None:
        line += f"  client {level.loadgen_cpu_share * 100:.0f}% of a core"
    return line
