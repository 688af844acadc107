"""Ownership election of the control plane (issue 14, point 3), without Ray: two contenders
on one job store, the holder's work started and stopped with its term, a takeover when the
holder goes, and the fences that refuse an old term's writes (the route board, the
scheduler's job states)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine
from waiting import wait_until

from serving.config.control_plane import ControlPlaneConfig
from serving.control_plane import ControlPlane, holder_is_dead_here, this_holder
from serving.rollout.route_table import RouteBoard, StaleTerm
from training.db import create_db_engine, create_tables
from training.jobs import JobState, JobStore
from training.leases import LeaseLost, LeaseStore, Term
from training.spec import parse_job_spec

FAST = ControlPlaneConfig(lease_duration_s=1.5, renew_deadline_s=1.0, retry_period_s=0.2)
"""Short timings: a takeover within 1.5 + 0.2 s of the holder's last renewal."""


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'loom.db'}")
    create_tables(engine)
    return engine


class Work:
    """What a holder runs: a log of take-overs (their epochs) and step-downs."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.lock = threading.Lock()

    def take_over(self, term: Term) -> None:
        with self.lock:
            self.events.append(f"up {term.epoch}")

    def step_down(self) -> None:
        with self.lock:
            self.events.append("down")


def plane(
    engine: Engine, holder: str, work: Work, config: ControlPlaneConfig = FAST
) -> ControlPlane:
    return ControlPlane(
        config, LeaseStore(engine), take_over=work.take_over, step_down=work.step_down,
        holder=holder,
    )  # fmt: skip


def until(condition: Callable[[], bool]) -> None:
    wait_until(condition, "the control plane's roles", deadline_s=30.0, poll_s=0.02)


def holder_then_standby(holder: ControlPlane, standby: ControlPlane) -> None:
    """Start ``holder`` and wait until it holds the lease, then ``standby`` until it stands by."""
    holder.start()
    until(lambda: holder.role == "holder")
    standby.start()
    until(lambda: standby.role == "standby")


def test_one_of_two_servers_holds_the_control_plane_and_the_other_stands_by(
    engine: Engine,
) -> None:
    work_a, work_b = Work(), Work()
    a, b = plane(engine, "host-a:1", work_a), plane(engine, "host-b:2", work_b)
    holder_then_standby(a, b)
    try:
        assert work_a.events == ["up 1"]
        assert work_b.events == []  # the standby runs nothing
    finally:
        b.stop()
        a.stop()
    assert work_a.events == ["up 1", "down"]


def test_the_standby_takes_over_when_the_holder_stops_renewing(engine: Engine) -> None:
    work_a, work_b = Work(), Work()
    a, b = plane(engine, "host-a:1", work_a), plane(engine, "host-b:2", work_b)
    holder_then_standby(a, b)
    a.elector.stop(release=False)  # as if killed: no release, the lease must lapse
    lapsed = time.monotonic()
    until(lambda: b.role == "holder")
    waited_s = time.monotonic() - lapsed
    try:
        assert work_b.events == ["up 2"]  # a new term, the next epoch
        # within lease duration + retry period (+ the renewals' own slack)
        print(f"took over {waited_s:.2f} s after the holder's last renewal")
    finally:
        b.stop()


def test_a_released_lease_is_taken_over_at_once(engine: Engine) -> None:
    work_a, work_b = Work(), Work()
    a = plane(engine, "host-a:1", work_a)
    slow = ControlPlaneConfig(lease_duration_s=600, renew_deadline_s=10, retry_period_s=0.2)
    b = plane(engine, "host-b:2", work_b, slow)
    holder_then_standby(a, b)
    a.stop()  # released: no 600 s wait
    until(lambda: b.role == "holder")
    b.stop()
    assert work_a.events == ["up 1", "down"]
    assert work_b.events == ["up 2", "down"]


def test_a_holder_killed_on_this_host_is_released_at_the_next_start(engine: Engine) -> None:
    leases = LeaseStore(engine)
    dead = "{}:{}".format(this_holder().rpartition(":")[0], 2**22 + 7)  # no such pid
    assert holder_is_dead_here(dead)
    assert not holder_is_dead_here(this_holder())
    assert not holder_is_dead_here("elsewhere:1")
    leases.acquire(FAST.lease_name, dead, duration_s=600)
    work = Work()
    restarted = plane(engine, this_holder(), work)
    restarted.start()
    until(lambda: restarted.role == "holder")  # not after 600 s
    restarted.stop()
    assert work.events == ["up 2", "down"]


def test_the_route_board_refuses_a_table_from_an_older_term() -> None:
    board = RouteBoard()

    async def run() -> None:
        assert await board.publish({}, {}, term=1) == 1
        assert await board.publish({}, {}, term=2) == 2
        with pytest.raises(StaleTerm):
            await board.publish({"m": ()}, {}, term=1)  # the old holder, late
        assert (await board.table()).routes == {}  # nothing of it landed
        assert await board.publish({}, {}, term=2) == 3

    asyncio.run(run())


def test_the_schedulers_job_store_refuses_a_state_change_for_an_old_term(engine: Engine) -> None:
    leases = LeaseStore(engine)
    old = leases.acquire("loom-control-plane", "host-a:1", duration_s=60)
    assert old is not None
    job = JobStore(engine).submit(parse_job_spec({"name": "j", "trainer": "lm"}))
    fenced = JobStore(engine, fence=lambda conn: leases.check(conn, old))
    fenced.start(job.id, stage="starting")  # the holder's own write lands
    assert leases.release(old)
    assert leases.acquire("loom-control-plane", "host-b:2", duration_s=60) is not None
    with pytest.raises(LeaseLost):
        fenced.fail(job.id, "written late by the old holder")
    assert JobStore(engine).get(job.id).state == JobState.RUNNING  # unchanged


@pytest.mark.parametrize(
    ("duration_s", "deadline_s", "retry_s"), [(10, 10, 2), (10, 12, 2), (10, 2.4, 2)]
)
def test_control_plane_timings_that_would_let_two_holders_act_are_refused(
    duration_s: float, deadline_s: float, retry_s: float
) -> None:
    with pytest.raises(ValueError, match="must be longer"):
        ControlPlaneConfig(
            lease_duration_s=duration_s, renew_deadline_s=deadline_s, retry_period_s=retry_s
        )


def test_kubernetes_leases_without_a_cluster_to_reach_are_a_clear_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from serving.config import ConfigError
    from serving.control_plane import lease_backend

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="no cluster to reach"):
        lease_backend(ControlPlaneConfig(lease_backend="kubernetes"), "sqlite://")


def test_a_sub_second_lease_is_refused_with_kubernetes_leases_at_config_time() -> None:
    """A Lease counts whole seconds: such timings would fail at every renewal instead."""
    fast = {"lease_duration_s": 0.9, "renew_deadline_s": 0.6, "retry_period_s": 0.2}
    ControlPlaneConfig(**fast)  # the job store takes them
    with pytest.raises(ValueError, match="at least 1 with the kubernetes backend"):
        ControlPlaneConfig(lease_backend="kubernetes", **fast)


def test_a_take_over_that_fails_is_reported_and_the_server_never_reads_as_holder(
    engine: Engine,
) -> None:
    def fail(term: Term) -> None:
        raise RuntimeError("Serve refused the gateway")

    failing = ControlPlane(
        FAST, LeaseStore(engine), take_over=fail, step_down=lambda: None, holder="host-a:1"
    )
    failing.start()
    try:
        until(lambda: failing.failed is not None)
        assert isinstance(failing.failed, RuntimeError)
        assert failing.role == "starting"  # it holds the lease, but serves nothing
        assert not failing.ready.is_set()
    finally:
        failing.stop()
