"""Leases as Kubernetes ``Lease`` objects (``training.k8s_leases``): one holder at a time, the
next epoch (``leaseTransitions``) for each new term, exactly one winner of a race, release
handing over at once, API failures a later try may get past surfacing as transient; the
elector over them; and the job store's fence refusing the late writes of a lost epoch.

``FakeCoordinationApi`` is a fake of the client's ``CoordinationV1Api``, in memory: the three
Lease calls ``KubernetesLeases`` makes, keeping the API server's semantics that matter here.
Every write bumps ``resourceVersion``; a replace carrying a stale ``resourceVersion`` answers
409 Conflict, a create of a name that exists 409, a read or replace of a missing one 404, all
as ``ApiException(status=...)``; it stores and returns ``V1Lease`` objects, copies like the
client's, so a caller's changes never reach the server unwritten. Lease arithmetic runs on a
hand clock; the elector cases wait for what the electors report, never for a time.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from contenders import FAST, Contender
from kubernetes import client
from kubernetes.client import V1Lease, V1LeaseSpec, V1ObjectMeta
from kubernetes.client.exceptions import ApiException
from sqlalchemy import Engine
from urllib3.exceptions import MaxRetryError, ProtocolError, ReadTimeoutError

from training.db import is_transient_error, jobs
from training.fences import FenceStore
from training.jobs import JobState, JobStore
from training.k8s_leases import KubernetesLeases, TransientLeaseError
from training.leases import ElectionTimings, LeaseLost, Term
from training.spec import parse_job_spec

NAMESPACE = "loom"


class FakeCoordinationApi:
    """``CoordinationV1Api``'s Lease calls, in memory (see the module docstring)."""

    def __init__(self) -> None:
        self.leases: dict[tuple[str, str], V1Lease] = {}
        self.fail: dict[str, Callable[[], Exception]] = {}
        """Call name -> what every call of it raises instead of answering, until removed."""
        self.between_read_and_write: Callable[[], None] | None = None
        """Runs once, as the next create or replace arrives: another contender's turn."""
        self.request_timeouts: list[float] = []
        self._revision = 0
        self._lock = threading.Lock()

    def read_namespaced_lease(
        self, name: str, namespace: str, *, _request_timeout: float
    ) -> V1Lease:
        self._arrive("read_namespaced_lease", _request_timeout)
        with self._lock:
            lease = self.leases.get((namespace, name))
            if lease is None:
                raise ApiException(status=404, reason="Not Found")
            return lease.model_copy(deep=True)

    def create_namespaced_lease(
        self, namespace: str, body: V1Lease, *, _request_timeout: float
    ) -> V1Lease:
        self._others_turn()
        self._arrive("create_namespaced_lease", _request_timeout)
        assert body.metadata is not None
        assert body.metadata.name is not None
        with self._lock:
            if body.metadata.resource_version:
                raise ApiException(status=400, reason="resourceVersion set on a create")
            if (namespace, body.metadata.name) in self.leases:
                raise ApiException(status=409, reason="AlreadyExists")
            return self._store(namespace, body.metadata.name, body)

    def replace_namespaced_lease(
        self, name: str, namespace: str, body: V1Lease, *, _request_timeout: float
    ) -> V1Lease:
        self._others_turn()
        self._arrive("replace_namespaced_lease", _request_timeout)
        assert body.metadata is not None
        with self._lock:
            stored = self.leases.get((namespace, name))
            if stored is None:
                raise ApiException(status=404, reason="Not Found")
            assert stored.metadata is not None
            version = body.metadata.resource_version
            if version and version != stored.metadata.resource_version:  # none: unconditional
                raise ApiException(status=409, reason="Conflict")
            return self._store(namespace, name, body)

    def spec(self, name: str) -> V1LeaseSpec:
        """The stored lease's spec, as the server holds it."""
        lease = self.leases[(NAMESPACE, name)]
        assert lease.spec is not None
        return lease.spec

    def _store(self, namespace: str, name: str, body: V1Lease) -> V1Lease:
        self._revision += 1
        assert body.metadata is not None
        metadata = body.metadata.model_copy(
            update={"resource_version": str(self._revision), "namespace": namespace}
        )
        self.leases[(namespace, name)] = body.model_copy(update={"metadata": metadata}, deep=True)
        return self.leases[(namespace, name)].model_copy(deep=True)

    def _arrive(self, call: str, request_timeout_s: float) -> None:
        self.request_timeouts.append(request_timeout_s)
        failure = self.fail.get(call)
        if failure is not None:
            raise failure()

    def _others_turn(self) -> None:
        turn, self.between_read_and_write = self.between_read_and_write, None
        if turn is not None:
            turn()


class HandClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> HandClock:
    return HandClock()


@pytest.fixture
def api() -> FakeCoordinationApi:
    return FakeCoordinationApi()


@pytest.fixture
def leases(api: FakeCoordinationApi, clock: HandClock) -> KubernetesLeases:
    return KubernetesLeases(api, NAMESPACE, clock=clock)


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def test_the_first_contender_holds_the_lease_at_epoch_1_until_it_expires(
    leases: KubernetesLeases, api: FakeCoordinationApi, clock: HandClock
) -> None:
    first = leases.acquire("scheduler", "a", duration_s=10)
    assert first == Term("scheduler", "a", 1, 1010.0)  # 1000 + 10 s
    spec = api.spec("scheduler")
    assert (spec.holder_identity, spec.lease_duration_seconds, spec.lease_transitions) == (
        "a",
        10,
        1,
    )
    assert spec.acquire_time == spec.renew_time == at(1000.0)
    assert spec.renew_time is not None
    assert spec.renew_time.tzinfo is not None
    assert leases.acquire("scheduler", "b", duration_s=10) is None
    clock.now = 1009.9
    assert leases.acquire("scheduler", "b", duration_s=10) is None
    assert leases.current("scheduler") == first
    clock.now = 1010.0  # renewTime 1000 + 10 s <= now: expired
    second = leases.acquire("scheduler", "b", duration_s=10)
    assert second == Term("scheduler", "b", 2, 1020.0)
    assert api.spec("scheduler").lease_transitions == 2  # a's term, then b's
    assert leases.current("scheduler") == second


def test_renewing_extends_the_lease_and_keeps_the_epoch(
    leases: KubernetesLeases, api: FakeCoordinationApi, clock: HandClock
) -> None:
    term = leases.acquire("scheduler", "a", duration_s=10)
    assert term is not None
    clock.now = 1008.0
    renewed = leases.renew(term, duration_s=10)
    assert renewed == Term("scheduler", "a", 1, 1018.0)  # 1008 + 10 s
    clock.now = 1015.0  # past the first expiry (1010), within the renewed one
    assert leases.acquire("scheduler", "b", duration_s=10) is None
    again = leases.acquire("scheduler", "a", duration_s=10)  # the holder acquiring renews
    assert again == Term("scheduler", "a", 1, 1025.0)
    spec = api.spec("scheduler")
    assert (spec.acquire_time, spec.renew_time) == (at(1000.0), at(1015.0))
    assert spec.lease_transitions == 1


def test_a_lost_term_can_neither_renew_nor_release(
    leases: KubernetesLeases, clock: HandClock
) -> None:
    term = leases.acquire("scheduler", "a", duration_s=10)
    assert term is not None
    clock.now = 1030.0  # a's pause outlived its lease; b took it over
    taken = leases.acquire("scheduler", "b", duration_s=10)
    assert taken is not None
    assert taken.epoch == 2
    assert leases.renew(term, duration_s=10) is None
    assert not leases.release(term)
    assert leases.current("scheduler") == taken


def test_an_expired_holder_acquiring_again_gets_the_next_epoch(
    leases: KubernetesLeases, clock: HandClock
) -> None:
    assert leases.acquire("scheduler", "a", duration_s=10) is not None
    clock.now = 1010.0  # expired: a may have stopped its work, so it is a new term
    assert leases.acquire("scheduler", "a", duration_s=10) == Term("scheduler", "a", 2, 1020.0)


def test_a_released_lease_is_taken_at_once_with_the_next_epoch(
    leases: KubernetesLeases, api: FakeCoordinationApi, clock: HandClock
) -> None:
    term = leases.acquire("scheduler", "a", duration_s=10)
    assert term is not None
    clock.now = 1001.0
    assert leases.release(term)
    spec = api.spec("scheduler")
    assert (spec.holder_identity, spec.lease_transitions) == (None, 1)  # epoch kept
    assert leases.current("scheduler") is None
    taken = leases.acquire("scheduler", "b", duration_s=10)  # 9 s before a's expiry
    assert taken == Term("scheduler", "b", 2, 1011.0)


def make_lease(spec: V1LeaseSpec | None) -> V1Lease:
    return V1Lease(metadata=V1ObjectMeta(name="scheduler", namespace=NAMESPACE), spec=spec)


@pytest.mark.parametrize(
    ("before", "epoch"),
    [
        (None, 1),  # no Lease yet: created
        (V1LeaseSpec(), 1),  # made by hand, empty
        (V1LeaseSpec(lease_transitions=3, renew_time=at(999.0), lease_duration_seconds=60), 4),
        (
            V1LeaseSpec(  # expired: 900 + 60 s <= 1000
                holder_identity="z",
                lease_transitions=3,
                renew_time=at(900.0),
                lease_duration_seconds=60,
            ),
            4,
        ),
    ],
    ids=["absent", "empty", "released", "expired"],
)
def test_a_free_lease_is_taken_with_the_next_epoch(
    leases: KubernetesLeases, api: FakeCoordinationApi, before: V1LeaseSpec | None, epoch: int
) -> None:
    if before is not None:
        api.create_namespaced_lease(NAMESPACE, make_lease(before), _request_timeout=1)
    assert leases.acquire("scheduler", "a", duration_s=10) == Term("scheduler", "a", epoch, 1010.0)
    assert api.spec("scheduler").lease_transitions == epoch


@pytest.mark.parametrize("before", ["absent", "expired"])
def test_two_contenders_that_read_the_same_version_elect_exactly_one(
    leases: KubernetesLeases, api: FakeCoordinationApi, clock: HandClock, before: str
) -> None:
    if before == "expired":
        assert leases.acquire("scheduler", "z", duration_s=10) is not None
        clock.now = 1010.0
    won: dict[str, Term | None] = {}

    def b_contends() -> None:  # b reads the version a read, and writes first
        won["b"] = leases.acquire("scheduler", "b", duration_s=10)

    api.between_read_and_write = b_contends  # a has read; b's whole turn runs now
    won["a"] = leases.acquire("scheduler", "a", duration_s=10)
    assert won["a"] is None  # a's write carried a stale version (or came second): refused
    assert won["b"] is not None
    assert leases.current("scheduler") == won["b"]


@pytest.mark.parametrize("duration_s", [0.5, 0.999, 0, -1, math.nan, math.inf])
def test_durations_a_lease_cannot_say_are_refused(
    leases: KubernetesLeases, api: FakeCoordinationApi, duration_s: float
) -> None:
    with pytest.raises(ValueError, match="at least 1 s"):
        leases.acquire("scheduler", "a", duration_s=duration_s)
    term = leases.acquire("scheduler", "a", duration_s=10)
    assert term is not None
    with pytest.raises(ValueError, match="at least 1 s"):
        leases.renew(term, duration_s=duration_s)
    assert api.spec("scheduler").lease_duration_seconds == 10  # nothing written


def test_a_duration_is_rounded_up_to_whole_seconds(
    leases: KubernetesLeases, api: FakeCoordinationApi
) -> None:
    term = leases.acquire("scheduler", "a", duration_s=1.5)
    assert term == Term("scheduler", "a", 1, 1002.0)  # ceil(1.5) = 2 s, never less than asked
    assert api.spec("scheduler").lease_duration_seconds == 2


def test_roles_are_leased_apart(leases: KubernetesLeases) -> None:
    assert leases.acquire("scheduler", "a", duration_s=10) is not None
    assert leases.acquire("reconciler", "b", duration_s=10) is not None


def test_every_call_carries_a_request_timeout(api: FakeCoordinationApi) -> None:
    leases = KubernetesLeases(api, NAMESPACE, request_timeout_s=2.5)
    term = leases.acquire("scheduler", "a", duration_s=10)
    assert term is not None
    leases.renew(term, duration_s=10)
    leases.release(term)
    assert api.request_timeouts == [2.5] * 6  # read + create, read + replace, read + replace


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        (lambda: ApiException(status=503, reason="Service Unavailable"), 503),
        (lambda: ApiException(status=500, reason="Internal Server Error"), 500),
        (lambda: ApiException(status=429, reason="Too Many Requests"), 429),
        (lambda: MaxRetryError(None, "/apis/coordination.k8s.io"), None),  # type: ignore[arg-type]
        (lambda: ProtocolError("Connection aborted."), None),
        (lambda: ReadTimeoutError(None, "/apis/coordination.k8s.io", "read timed out"), None),  # type: ignore[arg-type]
    ],
    ids=["503", "500", "429", "max-retries", "connection-aborted", "read-timeout"],
)
def test_an_api_server_away_or_busy_surfaces_as_a_transient_error(
    leases: KubernetesLeases,
    api: FakeCoordinationApi,
    failure: Callable[[], Exception],
    status: int | None,
) -> None:
    api.fail["read_namespaced_lease"] = failure
    with pytest.raises(TransientLeaseError) as raised:
        leases.acquire("scheduler", "a", duration_s=10)
    assert raised.value.status == status
    assert is_transient_error(raised.value)  # so the elector logs it and tries again


@pytest.mark.parametrize("status", [403, 422])
def test_an_api_error_that_will_recur_is_raised_as_it_came(
    leases: KubernetesLeases, api: FakeCoordinationApi, status: int
) -> None:
    api.fail["replace_namespaced_lease"] = lambda: ApiException(status=status)
    assert leases.acquire("scheduler", "a", duration_s=10) is not None  # a create: unaffected
    with pytest.raises(ApiException) as raised:
        leases.acquire("scheduler", "a", duration_s=10)  # a renewal: a replace
    assert raised.value.status == status
    assert not is_transient_error(raised.value)  # RBAC or a bad body: logged as a bug


def test_from_cluster_reads_a_kubeconfig_outside_a_pod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        """
apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: "https://k8s.example:6443", insecure-skip-tls-verify: true}
users:
- name: u
  user: {token: not-a-secret}
contexts:
- name: ctx
  context: {cluster: c, user: u}
current-context: ctx
"""
    )
    leases = KubernetesLeases.from_cluster("loom", config_file=str(kubeconfig))
    assert isinstance(leases.api, client.CoordinationV1Api)
    assert leases.api.api_client.configuration.host == "https://k8s.example:6443"
    assert client.Configuration.get_default_copy().host != "https://k8s.example:6443"


LONG_LEASE = ElectionTimings(duration_s=600.0, renew_deadline_s=0.6, retry_period_s=0.1)
"""Renewing as fast as FAST, but a lease that outlives the test: only a release frees it."""


@pytest.fixture
def electing(api: FakeCoordinationApi) -> Iterator[Callable[[str, ElectionTimings], Contender]]:
    made: list[Contender] = []

    def contender(holder: str, timings: ElectionTimings) -> Contender:
        made.append(Contender(KubernetesLeases(api, NAMESPACE), holder, timings))
        return made[-1]

    yield contender
    for each in made:
        each.elector.stop()


def test_a_standby_takes_over_when_the_holder_stops_without_releasing(
    electing: Callable[[str, ElectionTimings], Contender], api: FakeCoordinationApi
) -> None:
    a, b = electing("a", FAST), electing("b", FAST)
    a.elector.start()
    assert a.elected.wait(30)
    b.elector.start()
    a.elector.stop(release=False)  # dies: no release, the lease must expire
    assert a.lost.is_set()
    assert b.elected.wait(30)
    assert (a.epochs, b.epochs) == ([1], [2])
    assert api.spec("reconciler").lease_transitions == 2


def test_a_holder_stopping_cleanly_hands_over_before_its_lease_expires(
    electing: Callable[[str, ElectionTimings], Contender],
) -> None:
    a, b = electing("a", LONG_LEASE), electing("b", LONG_LEASE)
    a.elector.start()
    assert a.elected.wait(30)
    b.elector.start()
    a.elector.stop()  # released: b need not wait out the 600 s lease
    assert b.elected.wait(30)
    assert b.epochs == [2]


def test_a_holder_whose_renewals_conflict_gives_the_role_up(
    electing: Callable[[str, ElectionTimings], Contender], api: FakeCoordinationApi
) -> None:
    a = electing("a", LONG_LEASE)
    a.elector.start()
    assert a.elected.wait(30)
    api.fail["replace_namespaced_lease"] = lambda: ApiException(status=409, reason="Conflict")
    assert a.lost.wait(30)  # its next renewal was answered 409: another wrote the lease
    assert a.elector.term is None


def test_a_holder_that_cannot_reach_the_api_server_gives_the_role_up_and_says_why(
    electing: Callable[[str, ElectionTimings], Contender],
    api: FakeCoordinationApi,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = electing("a", LONG_LEASE)
    a.elector.start()
    assert a.elected.wait(30)
    with caplog.at_level(logging.WARNING, logger="training.leases"):
        api.fail["read_namespaced_lease"] = lambda: ApiException(status=503)
        assert a.lost.wait(30)  # no renewal within renew_deadline_s
    assert a.elector.term is None
    logged = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "training.leases"]
    assert any("store unavailable" in message for _, message in logged)
    assert all(level < logging.ERROR for level, _ in logged)  # transient: no traceback


def test_after_a_takeover_the_old_holders_late_write_is_refused(
    db_engine: Engine, leases: KubernetesLeases, clock: HandClock
) -> None:
    fence = FenceStore(db_engine)
    job = JobStore(db_engine).submit(parse_job_spec({"name": "tiny-lm", "trainer": "lm"}))

    def mark(term: Term, state: JobState) -> None:
        with fence.fenced(term) as conn:
            conn.execute(jobs.update().where(jobs.c.id == job.id.value).values(state=state.value))

    old = leases.acquire("scheduler", "a", duration_s=10)
    assert old is not None
    mark(old, JobState.RUNNING)
    clock.now = 1011.0  # a paused past its lease
    new = leases.acquire("scheduler", "b", duration_s=10)
    assert new is not None
    with fence.fenced(new):  # b raises the fence on election, before it acts
        pass
    with pytest.raises(LeaseLost, match="epoch 1 of a is over"):
        mark(old, JobState.FAILED)
    assert JobStore(db_engine).get(job.id).state == JobState.RUNNING
    mark(new, JobState.SUCCEEDED)
    assert JobStore(db_engine).get(job.id).state == JobState.SUCCEEDED
