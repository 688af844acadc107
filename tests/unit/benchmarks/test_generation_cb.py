"""The cb variant's closed loop and settings, on a fake engine and a fake clock (the real
manager on a small GPT-2 is tested in ``test_generation_bench``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from benchmarks.generation import GenerationBenchConfig, run_cb
from benchmarks.generation_cb import CbSettings, FinishedRequest, cb_settings, run_closed_loop
from benchmarks.generation_model import GenerationRequest
from benchmarks.generation_report import window_figures

S = 1_000_000_000  # ns per second
MS = 1_000_000


@dataclass
class FakeClock:
    now_ns: int = 0

    def __call__(self) -> int:
        return self.now_ns


@dataclass
class FakeEngine:
    """Runs every request at once, each done ``service_ns`` after it was sent, its first token
    ``first_ns`` after; ``next_finished`` moves the clock to the next one to end."""

    clock: FakeClock
    service_ns: int = 1 * S
    first_ns: int = 100 * MS
    short_ids: set[str] = field(default_factory=set)
    failing_ids: set[str] = field(default_factory=set)
    sent: list[GenerationRequest] = field(default_factory=list)
    running: dict[str, tuple[int, int, GenerationRequest]] = field(default_factory=dict)
    most_in_flight: int = 0

    def submit(self, request: GenerationRequest) -> str:
        request_id = str(len(self.sent))
        self.sent.append(request)
        now = self.clock.now_ns
        self.running[request_id] = (now + self.service_ns, now + self.first_ns, request)
        self.most_in_flight = max(self.most_in_flight, len(self.running))
        return request_id

    def next_finished(self, timeout_s: float) -> FinishedRequest | None:
        request_id = min(self.running, key=lambda r: (self.running[r][0], int(r)))
        done_ns, first_ns, request = self.running.pop(request_id)
        self.clock.now_ns = max(self.clock.now_ns, done_ns)
        if request_id in self.failing_ids:
            return FinishedRequest(request_id=request_id, first_token_ns=None, tokens=0,
                                   error="boom")  # fmt: skip
        tokens = request.max_tokens - (request_id in self.short_ids)
        return FinishedRequest(request_id=request_id, first_token_ns=first_ns, tokens=tokens)


REQUESTS = [GenerationRequest(f"p{i}", n) for i, n in enumerate([10, 20, 30, 40])]


def test_each_client_keeps_one_request_in_flight_until_the_window_closes() -> None:
    clock = FakeClock()
    engine = FakeEngine(clock)
    result = run_closed_loop(engine, REQUESTS, concurrency=2, warmup_s=1, duration_s=3,
                             clock=clock)  # fmt: skip
    assert engine.most_in_flight == 2
    # 1 s each: both clients send at 0, 1, 2 and 3 s; the answers at 4 s come as the window
    # [1 s, 4 s] closes, so nothing more is sent: 8 requests
    assert len(result.timings) == 8
    assert [t.sent_ns // S for t in result.timings] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert {t.ttft_ns for t in result.timings} == {100 * MS}
    assert (result.window_start_ns, result.window_end_ns) == (1 * S, 4 * S)
    assert (result.errors, result.short) == (0, 0)


def test_clients_start_apart_in_the_request_list_and_walk_it_in_turn() -> None:
    clock = FakeClock()
    engine = FakeEngine(clock)
    run_closed_loop(engine, REQUESTS, concurrency=2, warmup_s=0, duration_s=2, clock=clock)
    # 4 requests / 2 clients: client 0 starts at request 0, client 1 at request 2
    assert [r.max_tokens for r in engine.sent] == [10, 30, 20, 40]


def test_tokens_in_the_window_follow_the_closed_loop() -> None:
    clock = FakeClock()
    result = run_closed_loop(FakeEngine(clock), REQUESTS, concurrency=2, warmup_s=1,
                             duration_s=3, clock=clock)  # fmt: skip
    figures = window_figures(result.timings, result.window_start_ns, result.window_end_ns)
    # requests sent at 1, 2 and 3 s run wholly inside [1 s, 4 s]: client 0 sends 20, 30, 40
    # tokens, client 1 40, 10, 20; the ones sent at 0 s end as the window opens
    assert figures.tokens == pytest.approx(20 + 30 + 40 + 40 + 10 + 20)
    assert figures.requests == 6  # sent at 1, 2 and 3 s by each client


def test_short_answers_sent_in_the_window_and_failures_in_it_are_counted() -> None:
    clock = FakeClock()
    # request 0 is sent at 0 s (warm-up): its shortfall is not counted; 2 and 4 are in the window
    engine = FakeEngine(clock, short_ids={"0", "2"}, failing_ids={"4"})
    result = run_closed_loop(engine, REQUESTS, concurrency=2, warmup_s=1, duration_s=3,
                             clock=clock)  # fmt: skip
    assert result.short == 1  # request 2 only
    assert result.errors == 1
    assert result.error_kinds == {"boom": 1}
    assert len(result.timings) == 7  # 8 sent, 1 failed


def test_a_request_that_never_ends_fails_the_level_after_the_drain_timeout() -> None:
    clock = FakeClock()

    class Stuck(FakeEngine):
        def next_finished(self, timeout_s: float) -> FinishedRequest | None:
            self.clock.now_ns += round(timeout_s * S)
            return None

    with pytest.raises(RuntimeError, match="2 requests still running 5 s after"):
        run_closed_loop(Stuck(clock), REQUESTS, concurrency=2, warmup_s=0, duration_s=1,
                        drain_timeout_s=5, clock=clock)  # fmt: skip


def test_closed_loop_refuses_no_requests_and_no_window() -> None:
    with pytest.raises(ValueError, match="one request"):
        run_closed_loop(FakeEngine(FakeClock()), [], concurrency=1, warmup_s=0, duration_s=1)
    with pytest.raises(ValueError, match="duration_s"):
        run_closed_loop(FakeEngine(FakeClock()), REQUESTS, concurrency=1, warmup_s=0,
                        duration_s=0)  # fmt: skip


def test_cb_settings_give_every_client_a_sequence_and_a_full_context() -> None:
    settings = cb_settings(max_concurrency=32, context_tokens=512, attention="sdpa")
    assert settings.max_sequences == 32
    assert settings.kv_cache_tokens == 16384  # 32 x 512
    assert settings.kv_cache_pages == 256  # 16384 / 64 per page
    assert settings.max_batch_tokens == 1024  # the stack's default
    assert (
        cb_settings(max_concurrency=2000, context_tokens=8, attention="eager").max_batch_tokens
        == 2000
    )


def test_cb_settings_round_the_cache_up_to_whole_pages() -> None:
    assert CbSettings(kv_cache_tokens=100, page_tokens=64).kv_cache_pages == 2  # ceil(1.56)
    with pytest.raises(ValueError, match="one page"):
        CbSettings(kv_cache_tokens=10, page_tokens=64)


def test_run_cb_records_the_error_when_the_model_has_no_continuous_batching() -> None:
    model = SimpleNamespace(config=SimpleNamespace(n_positions=128))  # no manager API
    record = run_cb(model, tokenizer=None, requests=REQUESTS, config=GenerationBenchConfig())
    assert record["levels"] == []
    assert record["error"].startswith("RuntimeError: transformers ")
    assert "has no SimpleNamespace.init_continuous_batching" in record["error"]
