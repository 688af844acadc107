"""Ownership election for the control plane (Burns ch. 10): of the `loom serve` processes
sharing a job store and a Ray cluster, one holds the lease and runs the rollout reconciler
and the training scheduler; the others stand by and take over when its lease lapses.

Each term carries its lease epoch, and the holder's writes are fenced by it: the route board
refuses a table published for an older term, and the scheduler's job store refuses a job
state written for one (``training.leases``, ``training.fences``). A holder that loses the
lease (it could not renew in time: paused, partitioned, its store away) steps down at once;
what it still tried to write late is refused. The gateways, the model replicas and running
jobs' workers live in the Ray cluster, not in `loom serve`: a takeover moves no traffic.

    plane = ControlPlane(config.control_plane, db_url, take_over=..., step_down=...)
    plane.start()        # contends in a thread; take_over(term) runs in a thread of its own
    plane.role           # "holder", "standby" or "starting"
    plane.stop()         # steps down and releases the lease: a standby takes over at once
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

import psutil

from serving.config import ConfigError
from serving.config.control_plane import ControlPlaneConfig
from training.leases import Elector, LeaseBackend, LeaseStore, Term

logger = logging.getLogger(__name__)


def this_holder() -> str:
    """This process's name as a lease holder: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def holder_is_dead_here(holder: str) -> bool:
    """True when ``holder`` names a process on this host that no longer runs (a `loom serve`
    killed here: its lease need not be waited out)."""
    host, _, pid = holder.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not psutil.pid_exists(int(pid))


def lease_backend(config: ControlPlaneConfig, db_url: str) -> LeaseBackend:
    if config.lease_backend == "kubernetes":
        from kubernetes.config import ConfigException

        from training.k8s_leases import KubernetesLeases

        try:
            return KubernetesLeases.from_cluster(config.kubernetes_namespace)
        except ConfigException as exc:  # neither in a pod nor a kubeconfig: say so, once
            raise ConfigError(
                f"control_plane.lease_backend: kubernetes, but no cluster to reach ({exc})"
            ) from None
    from training.db import create_db_engine, create_tables

    engine = create_db_engine(db_url)
    create_tables(engine)
    return LeaseStore(engine)


class ControlPlane:
    """Contends for the control-plane lease; runs ``take_over(term)`` (in a thread: it may
    take a minute, and the lease must be renewed meanwhile) when elected and
    ``step_down()`` when the term ends."""

    def __init__(
        self,
        config: ControlPlaneConfig,
        backend: LeaseBackend,
        *,
        take_over: Callable[[Term], None],
        step_down: Callable[[], None],
        holder: str | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.holder = holder or this_holder()
        self._take_over = take_over
        self._step_down = step_down
        self._lock = threading.Lock()
        self.term: Term | None = None
        self.ready = threading.Event()
        """Set once a term's take-over has finished."""
        self.failed: BaseException | None = None
        """Why the latest take-over failed, if it did."""
        self.elector = Elector(
            backend,
            config.lease_name,
            self.holder,
            on_elected=self._elected,
            on_lost=self._lost,
            timings=config.timings(),
        )

    @property
    def role(self) -> str:
        if self.term is not None:
            return "holder" if self.ready.is_set() else "starting"
        other = self.current_holder()
        return "standby" if other is not None else "starting"

    def current_holder(self) -> str | None:
        """Who holds the lease now, if anyone (another process, or this one)."""
        try:
            term = self.backend.current(self.config.lease_name)
        except Exception as exc:  # the store away: unknown
            logger.warning("control plane: lease not read (%s)", exc)
            return None
        return None if term is None else term.holder

    def start(self) -> None:
        self._release_dead_holder()
        self.elector.start()

    def stop(self) -> None:
        """Step down (``step_down`` runs) and release the lease for a standby."""
        self.elector.stop(release=True)

    def _release_dead_holder(self) -> None:
        """A holder killed on this host (a restart of the same `loom serve`) holds the lease
        until it expires; it is released now instead: nobody else can be that process."""
        try:
            term = self.backend.current(self.config.lease_name)
            if term is not None and holder_is_dead_here(term.holder):
                logger.info("control plane: releasing the lease of %s (not running)", term.holder)
                self.backend.release(term)
        except Exception as exc:
            logger.warning("control plane: a dead holder's lease not released (%s)", exc)

    def _elected(self, term: Term) -> None:
        with self._lock:
            self.term = term
            self.ready.clear()
            self.failed = None
        logger.info("control plane: %s takes over (epoch %d)", self.holder, term.epoch)
        threading.Thread(
            target=self._run_take_over, args=(term,), name="loom-take-over", daemon=True
        ).start()

    def _run_take_over(self, term: Term) -> None:
        try:
            self._take_over(term)
        except BaseException as exc:
            logger.exception("control plane: taking over failed")
            self.failed = exc
            return
        with self._lock:
            if self.term is not None and self.term.epoch == term.epoch:  # not lost meanwhile
                self.ready.set()

    def _lost(self) -> None:
        with self._lock:
            self.term = None
            self.ready.clear()
        logger.warning("control plane: %s steps down", self.holder)
        try:
            self._step_down()
        except Exception:
            logger.exception("control plane: stepping down failed")
