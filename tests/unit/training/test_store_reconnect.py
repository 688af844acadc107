"""The job store on PostgreSQL survives its server dropping every connection (what a restart
does to a client): the next operations reconnect and succeed, and no state change is lost or
applied twice.

Another connection kills this test's connections with ``pg_terminate_backend``, and only
this test's (each test's engine names itself with a unique ``application_name``; other tests
share the server). ``pg_terminate_backend(pid, timeout)`` returns once the backend is gone, so
every kill has landed before the next operation runs.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from postgres_schema import POSTGRES_URL, fresh_schema
from sqlalchemy import Engine, event, text
from sqlalchemy.exc import OperationalError

from training.db import create_db_engine, create_tables
from training.jobs import JobId, JobState, JobStore
from training.spec import parse_job_spec
from training.work_queue import WorkQueue

KILL = text(
    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 30000)) FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name = :app"
)


@dataclass
class Server:
    engine: Engine
    admin: Engine
    app: str

    def drop_connections(self) -> int:
        """Terminate every server connection of ``engine``; how many there were."""
        with self.admin.connect() as conn:
            return int(conn.execute(KILL, {"app": self.app}).scalar_one())


@pytest.fixture
def server() -> Iterator[Server]:
    with fresh_schema() as schema:
        app = f"loom_reconnect_{uuid.uuid4().hex[:12]}"
        engine = create_db_engine(f"{POSTGRES_URL}?application_name={app}", schema=schema)
        admin = create_db_engine(POSTGRES_URL)
        try:
            create_tables(engine)
            yield Server(engine, admin, app)
        finally:
            engine.dispose()
            admin.dispose()


def spec() -> Any:
    return parse_job_spec({"name": "tiny-lm", "trainer": "lm", "webhook_url": "http://h.test/"})


def test_every_store_operation_after_the_server_dropped_its_connections_succeeds_once(
    server: Server,
) -> None:
    store = JobStore(server.engine)
    queue = WorkQueue(server.engine)
    job = store.submit(spec(), job_id="job-pg")
    steps = [
        lambda: store.start(job.id, stage="split"),
        lambda: store.report_progress(job.id, progress=0.25, metrics={"step": 5}),
        lambda: store.log(job.id, "split: 3 shards", stage="split"),
        lambda: queue.put("job-pg/tokenise", {"shard": 0}, max_attempts=3),
        lambda: queue.lease("job-pg/tokenise", "w1", lease_s=30.0),
        lambda: store.enter_stage(job.id, "train"),
        lambda: store.webhook_done(job.id, 1),
        lambda: store.succeed(job.id, metrics={"loss": 1.5}),
    ]
    results = []
    for step in steps:
        assert server.drop_connections() >= 1  # the pool's idle connection was there, and died
        results.append(step())
    lease = results[4]
    assert lease is not None
    assert server.drop_connections() >= 1
    assert queue.ack(lease, {"tokens": 10})

    server.drop_connections()
    done = store.get(job.id)
    assert done.state == JobState.SUCCEEDED
    assert done.metrics == {"step": 5, "loss": 1.5}
    events = store.events(job.id)
    assert [e.seq for e in events] == [1, 2, 3, 4]  # none lost, none twice
    assert [e.type for e in events] == [
        "loom.job.queued",
        "loom.job.running",
        "loom.job.running",
        "loom.job.succeeded",
    ]
    assert [line.message for line in store.logs(job.id)] == ["split: 3 shards"]
    counts = queue.counts("job-pg/tokenise")
    assert (counts.ready, counts.leased, counts.done) == (0, 0, 1)
    assert [e.seq for _, e in store.webhook_backlog()] == [2]  # the cursor moved once


def test_many_pooled_connections_dropped_at_once_are_each_replaced(server: Server) -> None:
    store = JobStore(server.engine)
    held = [server.engine.connect() for _ in range(4)]  # four in the pool, then idle
    for conn in held:
        conn.execute(text("SELECT 1"))
        conn.close()
    assert server.drop_connections() == 4
    for n in range(6):
        store.submit(spec(), job_id=f"job-{n}")
    assert [job.id.value for job in store.list(JobState.QUEUED)] == [f"job-{n}" for n in range(6)]


def test_a_connection_dropped_inside_a_state_change_writes_nothing_and_the_retry_writes_once(
    server: Server,
) -> None:
    store = JobStore(server.engine)
    job = store.submit(spec(), job_id="job-mid")
    drops = {"left": 1}

    @event.listens_for(server.engine, "before_cursor_execute")
    def drop_before_the_update(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # the row is locked (SELECT ... FOR UPDATE ran); the server dies before the UPDATE
        if drops["left"] and statement.lstrip().upper().startswith("UPDATE"):
            drops["left"] = 0
            assert server.drop_connections() == 1

    with pytest.raises(OperationalError):
        store.start(job.id, stage="split")
    assert store.get(job.id).state == JobState.QUEUED  # rolled back with the connection
    assert [e.seq for e in store.events(job.id)] == [1]
    store.start(job.id, stage="split")  # what the scheduler's retry does
    assert store.get(JobId("job-mid")).state == JobState.RUNNING
    assert [e.type for e in store.events(job.id)] == ["loom.job.queued", "loom.job.running"]
