"""The pipeline runner and the queue stage, without Ray: workers run as threads."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from training.queue_workers import QueueItem, QueueWorker, queue_name, run_queue_stage
from training.spec import parse_job_spec
from training.stages import JobStopped, Stage, StageContext, StageRejected, run_stages
from training.trainers.registry import TRAINERS, Trainer
from training.work_queue import WorkQueue
from training.workspace import JobWorkspace


def context(tmp_path: Path, **services: Any) -> StageContext:
    spec = parse_job_spec({"name": "t", "trainer": "digits", "stage_workers": 2})
    return StageContext(
        job_id="job-1", spec=spec, workspace=JobWorkspace(tmp_path, "job-1"), services=services
    )


def test_stages_run_in_order_and_each_sees_the_outputs_before_it(tmp_path: Path) -> None:
    seen = []

    def merge(c: StageContext) -> dict:
        seen.append(dict(c.outputs))
        return {"m": c.outputs["a"]["n"] * 3}

    stages = [
        Stage("a", "splitter", 0.5, lambda c: {"n": 2}),
        Stage("b", "merger", 0.5, merge),
    ]
    progress: list[float] = []
    outputs = run_stages(stages, context(tmp_path), on_progress=progress.append)
    assert outputs == {"a": {"n": 2}, "b": {"m": 6}}
    assert seen == [{"a": {"n": 2}}]
    assert progress == [0.5, 1.0]


def test_a_run_again_skips_the_stages_already_done(tmp_path: Path) -> None:
    calls = []

    def flaky(c: StageContext) -> dict:
        calls.append("b")
        if calls.count("b") == 1:
            raise OSError("disk full")
        return {"ok": True}

    stages = [
        Stage("a", "splitter", 0.5, lambda c: calls.append("a") or {"n": 1}),
        Stage("b", "merger", 0.5, flaky),
    ]
    with pytest.raises(OSError, match="disk full"):
        run_stages(stages, context(tmp_path))
    outputs = run_stages(stages, context(tmp_path))
    assert calls == ["a", "b", "b"]  # a ran once: its output was on disk for the second run
    assert outputs["a"] == {"n": 1}


def test_a_filter_rejection_and_a_stop_end_the_run(tmp_path: Path) -> None:
    def reject(c: StageContext) -> dict:
        raise StageRejected("accuracy 0.5 below 0.9")

    with pytest.raises(StageRejected, match="below 0.9"):
        run_stages([Stage("f", "filter", 1.0, reject)], context(tmp_path))
    stopping = context(tmp_path)
    stopping.should_stop = lambda: True
    with pytest.raises(JobStopped):
        run_stages([Stage("x", "sink", 1.0, lambda c: {})], stopping)


def double(payload: dict[str, Any]) -> dict[str, Any]:
    if payload["n"] < 0:
        raise ValueError("negative")
    return {"twice": payload["n"] * 2}


@pytest.fixture(autouse=True)
def test_trainer() -> Iterator[None]:
    """A trainer of this module's own, with one queue handler, registered while a test runs."""
    TRAINERS.register(Trainer(name="test", handlers={"test.double": double}))
    yield
    TRAINERS.unregister("test")


class ThreadWorkers:
    """The runner's worker service, with threads for actors."""

    def __init__(self, queue: WorkQueue) -> None:
        self.queue = queue
        self.threads: list[threading.Thread] = []

    def queue_workers(self, count: int, queue: str, handler: str) -> ThreadWorkers:
        for i in range(count):
            worker = QueueWorker(self.queue, f"w{i}")
            thread = threading.Thread(
                target=worker.run, args=(queue, handler), kwargs={"lease_s": 5.0}, daemon=True
            )
            thread.start()
            self.threads.append(thread)
        return self

    def keep_alive(self) -> None:
        pass

    def stop(self) -> None:
        for thread in self.threads:
            thread.join(timeout=10)


def test_a_queue_stage_returns_every_result_in_item_order(
    db_engine: Engine, tmp_path: Path
) -> None:
    queue = WorkQueue(db_engine)
    workers = ThreadWorkers(queue)
    ctx = context(tmp_path, queue=queue, workers=workers)
    items = [QueueItem(key=f"k{n}", payload={"n": n}) for n in range(7)]
    results = run_queue_stage(ctx, "double", items, handler="test.double", poll_interval_s=0.05)
    assert results == [{"twice": 2 * n} for n in range(7)]
    assert len(workers.threads) == 2  # stage_workers: 2
    assert all(not t.is_alive() for t in workers.threads)  # drained, then they ended


def test_a_queue_stage_fails_naming_the_dead_lettered_item(
    db_engine: Engine, tmp_path: Path
) -> None:
    queue = WorkQueue(db_engine, retry_base_s=0.01, retry_cap_s=0.01)
    ctx = context(tmp_path, queue=queue, workers=ThreadWorkers(queue))
    items = [
        QueueItem(key="ok", payload={"n": 1}),
        QueueItem(key="bad", payload={"n": -1, "name": "bad one"}),
    ]
    with pytest.raises(
        RuntimeError, match="bad one failed 2 times; last error: ValueError: negative"
    ):
        run_queue_stage(
            ctx, "double", items, handler="test.double", max_attempts=2, poll_interval_s=0.05
        )


def test_a_stage_run_again_puts_no_item_twice(db_engine: Engine, tmp_path: Path) -> None:
    queue = WorkQueue(db_engine)
    ctx = context(tmp_path, queue=queue, workers=ThreadWorkers(queue))
    items = [QueueItem(key=f"k{n}", payload={"n": n}) for n in range(3)]
    run_queue_stage(ctx, "double", items, handler="test.double", poll_interval_s=0.05)
    again = run_queue_stage(ctx, "double", items, handler="test.double", poll_interval_s=0.05)
    assert again == [{"twice": 0}, {"twice": 2}, {"twice": 4}]
    assert queue.counts(queue_name("job-1", "double")).done == 3


def test_an_unknown_handler_is_refused() -> None:
    with pytest.raises(ValueError, match="no queue handler named 'nope.x'"):
        TRAINERS.handler("nope.x")
