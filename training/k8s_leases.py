"""Leases as Kubernetes ``Lease`` objects (coordination.k8s.io/v1): the ``LeaseBackend`` that
``Elector`` contends through in a cluster, with the same terms and epochs as ``LeaseStore``.

    leases = KubernetesLeases.from_cluster("loom")    # in a pod, else the kubeconfig
    elector = Elector(leases, "reconciler", "pod-a", on_elected=start, on_lost=stop)
    elector.start()                                   # ... elector.stop() releases the lease

One ``Lease`` per role, named after it. Every write is optimistic: read the lease, then
replace it carrying the ``resourceVersion`` that was read. The API server refuses (409
Conflict) a replace made from a version another writer has replaced since, so of two
contenders that read the same version exactly one wins; the other is answered None, never an
error. A lease that does not exist yet (404 on read) is created; 409 on that create means
another contender created it first: None again.

How a ``Term`` maps onto the spec:

- ``holderIdentity`` is ``Term.holder``; cleared by ``release``.
- ``leaseTransitions`` is ``Term.epoch``, the fencing token. The first holder writes 1 and
  every new term adds 1: a change of holder, or the same holder again once its lease had
  expired or been released (as in ``LeaseStore``: a lapsed holder may have stopped its work,
  so it never resumes under the old epoch). Renewals keep it. client-go starts at 0 and counts
  changes of holder only, so a role's lease is not to be shared with client-go electors.
- ``renewTime`` + ``leaseDurationSeconds`` is ``Term.expires_at``, read against this
  process's clock, as ``LeaseStore`` reads its rows: contenders keep their clocks within a
  small part of the duration (NTP). ``acquireTime`` is when the term began. Both times are
  written timezone-aware (UTC).
- ``leaseDurationSeconds`` is ``duration_s`` rounded up to whole seconds (1.5 s -> 2 s): the
  lease outlives what the holder asked for, never the reverse, so the holder still gives the
  role up (``renew_deadline_s``) before a contender may take it. Durations under 1 s cannot
  be written as asked and are refused (``ValueError``), as are non-finite ones.

``release`` clears ``holderIdentity`` and keeps ``leaseTransitions``, only while the term
still holds the lease (client-go's ``ReleaseOnCancel`` does the same, and reads an empty
holder as free). Clearing the holder frees the lease for every contender whatever its clock;
backdating ``renewTime`` instead would leave it held in the eyes of a contender whose clock
runs behind by more than the backdating, and name a stale holder to ``kubectl get lease``.

What this hardens over the client's own ``kubernetes.leaderelection`` module:

- bad timings are refused with ``ValueError`` (``ElectionTimings``; durations here), where
  its ``Config`` calls ``sys.exit`` and takes the whole process down;
- the holder's work is told to stop the moment the lease is lost (``Elector``'s
  ``on_lost``), where its ``onstarted_leading`` thread runs on unstopped after a failed
  renewal, and its ``run`` never contends again;
- the lease is released on shutdown (``Elector.stop``), where it has no release: a standby
  waits out the whole lease;
- transitions are counted (``leaseTransitions``, the epoch), where it never writes them;
- an unreachable or overloaded API server (5xx, 429, a urllib3 connection error) raises
  ``TransientLeaseError``, which ``Elector`` logs and retries, where a connection error ends
  its loop's thread; and every call carries a timeout (``request_timeout_s``), so a hung API
  server cannot hold a renewal past the renew deadline.

A ``Lease`` cannot fence the writes a holder makes elsewhere: writes to the job store go
through ``training.fences.FenceStore.fenced(term)``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Protocol

from kubernetes import client, config
from kubernetes.client import V1Lease, V1LeaseSpec, V1ObjectMeta
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import MaxRetryError, ProtocolError, SSLError
from urllib3.exceptions import TimeoutError as Urllib3TimeoutError

from training.db import TransientError
from training.leases import Term

logger = logging.getLogger(__name__)


class TransientLeaseError(TransientError):
    """The API server was unreachable, failing (5xx) or throttling (429): a later try may
    succeed. ``training.db.is_transient_error`` knows it, so ``Elector`` logs it and retries.
    ``status`` is the HTTP status, None when no answer came (a connection error)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class LeaseApi(Protocol):
    """The three calls of ``kubernetes.client.CoordinationV1Api`` this module makes: the
    client's API satisfies it (``from_cluster`` passes one), and a test's fake is small."""

    def read_namespaced_lease(
        self, name: str, namespace: str, *, _request_timeout: float
    ) -> V1Lease: ...

    def create_namespaced_lease(
        self, namespace: str, body: V1Lease, *, _request_timeout: float
    ) -> V1Lease: ...

    def replace_namespaced_lease(
        self, name: str, namespace: str, body: V1Lease, *, _request_timeout: float
    ) -> V1Lease: ...


SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def pod_namespace(path: Path = SERVICE_ACCOUNT_NAMESPACE) -> str:
    """The namespace of the pod this process runs in (its service account's), else
    ``default``."""
    try:
        return path.read_text(encoding="utf-8").strip() or "default"
    except OSError:
        return "default"


class KubernetesLeases:
    """The leases of one namespace, as ``Lease`` objects; a ``LeaseBackend``.

        leases = KubernetesLeases(CoordinationV1Api(api_client), "loom")
        term = leases.acquire("scheduler", "pod-a", duration_s=15)   # a Term, or None
        term = leases.renew(term, duration_s=15)                      # None: lost

    ``request_timeout_s`` bounds each API call; keep it well under the elector's
    ``renew_deadline_s``.
    """

    def __init__(
        self,
        api: LeaseApi,
        namespace: str,
        *,
        clock: Callable[[], float] = time.time,
        request_timeout_s: float = 5.0,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self._clock = clock
        self._request_timeout_s = request_timeout_s

    @classmethod
    def from_cluster(
        cls, namespace: str | None, *, config_file: str | None = None
    ) -> KubernetesLeases:
        """Leases through the API server this process can reach: with ``config_file``, that
        kubeconfig; else the pod's service account when running in a cluster, else the
        default kubeconfig (``$KUBECONFIG`` or ``~/.kube/config``). The configuration is this
        object's own; the client's global default is left as it was. ``namespace`` None: the
        pod's own (``pod_namespace``)."""
        configuration = client.Configuration()
        if config_file is None:
            try:
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException:  # not in a pod
                config.load_kube_config(client_configuration=configuration)
        else:
            config.load_kube_config(config_file=config_file, client_configuration=configuration)
        api = client.CoordinationV1Api(client.ApiClient(configuration))
        return cls(api, namespace or pod_namespace())

    def acquire(self, name: str, holder: str, *, duration_s: float) -> Term | None:
        """The lease for ``holder``: a new term (the next epoch) when it was free or expired,
        the same epoch renewed when ``holder`` holds it already; None while another holds it,
        or when another contender wrote it first."""
        lease_s = lease_seconds(duration_s)
        now = self._clock()
        lease = self._read(name)
        spec = acquired_spec(None if lease is None else lease.spec, holder, now, lease_s)
        if spec is None:
            return None
        written = self._create(name, spec) if lease is None else self._replace(lease, spec)
        return held_term(name, spec, now) if written else None

    def renew(self, term: Term, *, duration_s: float) -> Term | None:
        """``term`` extended by ``duration_s`` (rounded up to whole seconds) from now; None when
        it is no longer the lease's (expired, another epoch) or another writer came first."""
        lease_s = lease_seconds(duration_s)
        now = self._clock()
        lease = self._read(term.name)
        if lease is None or lease.spec is None or not holds(term, lease.spec, now):
            return None
        spec = lease.spec.model_copy(
            update={"renew_time": _utc(now), "lease_duration_seconds": lease_s}
        )
        return held_term(term.name, spec, now) if self._replace(lease, spec) else None

    def release(self, term: Term) -> bool:
        """Give the lease up now, so a contender need not wait for it to expire; False when
        ``term`` had lost it already (or another writer came first)."""
        now = self._clock()
        lease = self._read(term.name)
        if lease is None or lease.spec is None or not holds(term, lease.spec, now):
            return False
        # the epoch stays: the next term, whoever holds it, is leaseTransitions + 1
        spec = lease.spec.model_copy(update={"holder_identity": None, "renew_time": _utc(now)})
        return self._replace(lease, spec)

    def current(self, name: str) -> Term | None:
        """Who holds ``name`` now; None when nobody does (never taken, expired, released)."""
        lease = self._read(name)
        return None if lease is None else held_term(name, lease.spec, self._clock())

    def _read(self, name: str) -> V1Lease | None:
        """The lease named ``name``; None when there is none (404)."""
        with _transient_errors(name):
            try:
                return self.api.read_namespaced_lease(
                    name, self.namespace, _request_timeout=self._request_timeout_s
                )
            except ApiException as exc:
                if exc.status == HTTPStatus.NOT_FOUND:
                    return None
                raise

    def _create(self, name: str, spec: V1LeaseSpec) -> bool:
        """Create the lease; False when another contender created it first (409)."""
        body = V1Lease(metadata=V1ObjectMeta(name=name, namespace=self.namespace), spec=spec)
        with _transient_errors(name):
            try:
                self.api.create_namespaced_lease(
                    self.namespace, body, _request_timeout=self._request_timeout_s
                )
            except ApiException as exc:
                if exc.status == HTTPStatus.CONFLICT:
                    logger.debug("lease %s: another contender created it first", name)
                    return False
                raise
        return True

    def _replace(self, read: V1Lease, spec: V1LeaseSpec) -> bool:
        """Write ``spec`` over the lease as it was ``read``, from the ``resourceVersion`` read;
        False when another writer replaced it since (409) or it was deleted (404)."""
        name = read.metadata.name if read.metadata is not None else None
        if name is None:
            raise ValueError("a lease read from the API server has no metadata.name")
        body = read.model_copy(update={"spec": spec})
        with _transient_errors(name):
            try:
                self.api.replace_namespaced_lease(
                    name, self.namespace, body, _request_timeout=self._request_timeout_s
                )
            except ApiException as exc:
                if exc.status in (HTTPStatus.CONFLICT, HTTPStatus.NOT_FOUND):
                    logger.debug("lease %s: written by another since it was read", name)
                    return False
                raise
        return True


def lease_seconds(duration_s: float) -> int:
    """``leaseDurationSeconds`` for ``duration_s``: whole seconds, rounded up (1.5 -> 2).
    Raises ``ValueError`` under 1 s (a Lease cannot say it) and for NaN or infinity."""
    if not (math.isfinite(duration_s) and duration_s >= 1):
        raise ValueError(
            f"duration_s ({duration_s}) must be finite and at least 1 s: a Lease counts "
            "whole seconds (leaseDurationSeconds)"
        )
    return math.ceil(duration_s)


def held_term(name: str, spec: V1LeaseSpec | None, now: float) -> Term | None:
    """The term ``spec`` grants at ``now``; None when it grants none: no holder (never taken,
    released), no ``renewTime`` or duration, or expired (``renewTime`` + duration <= now)."""
    expires_at = _expires_at(spec)
    if spec is None or not spec.holder_identity or expires_at is None or expires_at <= now:
        return None
    return Term(name, spec.holder_identity, spec.lease_transitions or 0, expires_at)


def holds(term: Term, spec: V1LeaseSpec, now: float) -> bool:
    """Whether ``term`` is still the lease's at ``now``: same holder, same epoch, unexpired."""
    held = held_term(term.name, spec, now)
    return held is not None and (held.holder, held.epoch) == (term.holder, term.epoch)


def acquired_spec(
    spec: V1LeaseSpec | None, holder: str, now: float, lease_s: int
) -> V1LeaseSpec | None:
    """The spec that gives the lease to ``holder`` at ``now`` for ``lease_s`` seconds: its own
    unexpired term renewed (same epoch, same ``acquireTime``), or a new term, epoch
    ``leaseTransitions`` + 1, when the lease is free or expired; None while another holds it."""
    current = spec or V1LeaseSpec()
    expires_at = _expires_at(current)
    held = current.holder_identity if expires_at is not None and expires_at > now else None
    if held is not None and held != holder:
        return None
    at = _utc(now)
    if held is not None:
        return current.model_copy(update={"renew_time": at, "lease_duration_seconds": lease_s})
    return current.model_copy(
        update={
            "holder_identity": holder,
            "lease_duration_seconds": lease_s,
            "acquire_time": at,
            "renew_time": at,
            "lease_transitions": (current.lease_transitions or 0) + 1,
        }
    )


def is_transient_status(status: int | None) -> bool:
    """Whether an API server's answer with ``status`` may succeed when tried again: a server
    error (5xx) or throttling (429 Too Many Requests)."""
    return status is not None and (status == HTTPStatus.TOO_MANY_REQUESTS or 500 <= status <= 599)


@contextmanager
def _transient_errors(name: str) -> Iterator[None]:
    """Raise what a later try may get past as ``TransientLeaseError``; the rest as it came."""
    try:
        yield
    except ApiException as exc:
        if not is_transient_status(exc.status):
            raise
        raise TransientLeaseError(
            f"lease {name}: the API server answered {exc.status} ({exc.reason})",
            status=exc.status,
        ) from exc
    except (MaxRetryError, ProtocolError, Urllib3TimeoutError) as exc:
        if isinstance(exc, MaxRetryError) and isinstance(exc.reason, SSLError):
            raise  # a certificate the client refuses is refused the same way next time
        raise TransientLeaseError(f"lease {name}: API server unreachable ({exc})") from exc


def _expires_at(spec: V1LeaseSpec | None) -> float | None:
    """``renewTime`` + ``leaseDurationSeconds``; None when the spec names no holder or lacks
    either field (a lease made by hand, or released)."""
    if (
        spec is None
        or not spec.holder_identity
        or spec.renew_time is None
        or spec.lease_duration_seconds is None
    ):
        return None
    return _seconds(spec.renew_time) + spec.lease_duration_seconds


def _utc(now: float) -> datetime:
    return datetime.fromtimestamp(now, tz=UTC)


def _seconds(at: datetime) -> float:
    """Seconds since the epoch; a naive time is read as UTC, the API server's."""
    return (at if at.tzinfo is not None else at.replace(tzinfo=UTC)).timestamp()
