"""GCS fault tolerance for the Ray head ``loom serve`` starts (``ray.gcs_redis_address``).

Ray keeps its cluster state (nodes, actors, placement groups, the KV store) in the GCS
process. By default in memory: a dead GCS ends the cluster. With an external Redis
(``RAY_REDIS_ADDRESS``) the GCS writes that state to Redis under a key prefix
(``RAY<namespace>@``, the namespace from ``RAY_external_storage_namespace``), and a GCS
started again with the same command line reloads it; raylets, workers and drivers reconnect
to it if it is back within ``gcs_rpc_server_reconnect_timeout_s`` (60 s by default), and meanwhile
actors keep running and calls between them (a Serve handle's call included) go on, since
they do not pass through the GCS.

Nothing restarts the GCS of a local head (KubeRay restarts the head pod; ``ray.init`` and
``ray start`` do not). Seen here, Ray 2.60, SIGKILL under load with Redis on and no restart:
requests through the gateway kept succeeding for the 60 s, then every Ray process of the
head, ``loom serve`` included, ended ("Failed to connect to GCS within 60 seconds").
So ``GcsWatchdog`` watches the GCS process and starts it again with its own command line,
environment and working directory (its port pinned to the one it had bound).

    namespace = storage_namespace(env.home, port)       # one per home and port
    os.environ.update(head_env(redis, namespace))        # before ray.init
    watchdog = GcsWatchdog.for_session(session_dir, gcs_port); watchdog.start()
    ...
    watchdog.stop(); ray.shutdown(); watchdog.close()   # then delete_namespace(redis, namespace)
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serving.config import RedisAddress
from serving.run_record import process_start_ticks, session_processes

logger = logging.getLogger(__name__)

GCS_EXECUTABLE = "gcs_server"
PORT_FLAG = "--gcs_server_port="
QUICK_EXIT_S = 10.0
"""A restarted GCS that dies sooner than this is failing to start (Redis gone, say): the
next restart waits longer (``next_restart_delay_s``)."""
MAX_RESTART_DELAY_S = 10.0
_PR_SET_PDEATHSIG = 1


def storage_namespace(home: Path, port: int) -> str:
    """The Redis key namespace of one server, from its home and port, so two stacks never
    share GCS state and a server started again on the same home and port finds (and removes)
    what a killed run left: ``loom-`` and 16 hex digits (no ``@``, Ray's separator)."""
    digest = hashlib.sha256(f"{Path(home).resolve()}:{port}".encode()).hexdigest()
    return f"loom-{digest[:16]}"


def head_env(redis: RedisAddress, namespace: str) -> dict[str, str]:
    """What a local head reads to keep its GCS in Redis: ``ray.init`` starting a head reads
    ``RAY_REDIS_ADDRESS``; every Ray process reads ``RAY_external_storage_namespace``."""
    return {"RAY_REDIS_ADDRESS": redis.url(), "RAY_external_storage_namespace": namespace}


def redis_reachable(redis: RedisAddress, *, timeout_s: float = 3.0) -> bool:
    """True if Redis answers PING (for TLS: accepts a connection). Checked before Ray is
    given the address: Ray's own Redis client aborts the whole process when it cannot
    connect."""
    try:
        with socket.create_connection((redis.host, redis.port), timeout=timeout_s) as sock:
            if redis.tls:
                return True
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def delete_namespace(redis: RedisAddress, namespace: str) -> bool:
    """Remove every GCS key of ``namespace`` (Ray's own cleanup, as KubeRay's uses). Only
    with no GCS of that namespace running. False, logged, if Redis is not reachable: the
    keys stay, and the next start on the same home and port removes them."""
    if not redis_reachable(redis):
        logger.warning("GCS keys of %s left in Redis at %s: not reachable", namespace, redis.url())
        return False
    from ray._private.gcs_utils import cleanup_redis_storage  # Ray's, not a public API

    return bool(cleanup_redis_storage(redis.host, redis.port, "", redis.tls, namespace))


@dataclass(frozen=True, kw_only=True)
class ProcessImage:
    """What it takes to start a process again as it was: its command line, environment and
    working directory, read from ``/proc`` while it runs."""

    pid: int
    start_ticks: int | None
    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: str

    @classmethod
    def of(cls, pid: int) -> ProcessImage:
        proc = Path("/proc") / str(pid)
        argv = tuple(a.decode() for a in (proc / "cmdline").read_bytes().split(b"\0") if a)
        env = dict(
            e.decode(errors="surrogateescape").split("=", 1)
            for e in (proc / "environ").read_bytes().split(b"\0")
            if b"=" in e
        )
        return cls(
            pid=pid,
            start_ticks=process_start_ticks(pid),
            argv=argv,
            env=env,
            cwd=os.readlink(proc / "cwd"),
        )

    def alive(self) -> bool:
        """The same process still runs (not a zombie, not a reused pid)."""
        started = process_start_ticks(self.pid)
        return started is not None and started == self.start_ticks


def find_gcs_server(session_dir: str) -> ProcessImage | None:
    """The GCS server of the Ray session ``session_dir``, or None if none runs."""
    for pid in session_processes(session_dir):
        with contextlib.suppress(OSError):
            image = ProcessImage.of(pid)
            if image.argv and Path(image.argv[0]).name == GCS_EXECUTABLE:
                return image
    return None


def restart_argv(argv: tuple[str, ...], port: int) -> list[str]:
    """The GCS command line with its port pinned: a head started by ``ray.init`` runs it
    with ``--gcs_server_port=0`` (any free port), and a restart must come back on the port
    every raylet and worker dials."""
    return [f"{PORT_FLAG}{port}" if a.startswith(PORT_FLAG) else a for a in argv]


def next_restart_delay_s(uptime_s: float | None, previous_delay_s: float) -> float:
    """How long to wait before the next restart: none after a GCS that ran a while (or the
    first one), else twice the last wait, from 0.5 s to 10 s: 0.5, 1, 2, 4, 8, 10, 10..."""
    if uptime_s is None or uptime_s >= QUICK_EXIT_S:
        return 0.0
    return min(max(previous_delay_s * 2, 0.5), MAX_RESTART_DELAY_S)


def _parent_death_signal() -> Callable[[], None]:
    """What the child runs before exec: block SIGINT (Ctrl-C to the terminal's group must not
    end it ahead of Ray's orderly shutdown; Ray blocks it in its own children alike) and, on
    Linux, die with the parent thread (the watchdog's), as Ray's fate-shared GCS dies with
    the driver. libc is looked up here, in the parent: after a fork only the call is safe."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None

    def setup() -> None:  # runs in the child
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return setup


class GcsWatchdog:
    """Starts the GCS server again, as it was, whenever it dies.

    watchdog = GcsWatchdog(ProcessImage.of(gcs_pid), port=gcs_port)
    watchdog.start()            # polls every poll_interval_s
    watchdog.stop(); ray.shutdown(); watchdog.close()

    ``stop`` ends the restarts (so Ray's shutdown can end the GCS); ``close`` ends the GCS it
    started, if any (Ray knows only the first). The thread that starts a GCS lives until
    ``close``: the child is bound to it (``PR_SET_PDEATHSIG``), so a SIGKILLed server takes
    its restarted GCS with it.
    """

    def __init__(self, image: ProcessImage, *, port: int, poll_interval_s: float = 0.1) -> None:
        self.image = image
        self.argv = restart_argv(image.argv, port)
        self.poll_interval_s = poll_interval_s
        self.restarts = 0
        self._child: subprocess.Popen[bytes] | None = None
        self._last_attempt: float | None = None  # monotonic, of the last restart tried
        self._delay_s = 0.0
        self._child_setup = _parent_death_signal()
        self._lock = threading.Lock()
        self._watching = False
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gcs-watchdog", daemon=True)

    @classmethod
    def for_session(cls, session_dir: str, port: int) -> GcsWatchdog | None:
        """A watchdog over the GCS of ``session_dir``; None (logged) if none is found."""
        image = find_gcs_server(session_dir)
        if image is None:
            logger.warning("no GCS server found for %s: it will not be restarted", session_dir)
            return None
        return cls(image, port=port)

    @property
    def pid(self) -> int:
        """The GCS now watched: the first, or the last one restarted."""
        return self._child.pid if self._child is not None else self.image.pid

    def start(self) -> None:
        self._watching = True
        self._thread.start()
        logger.info("watching the GCS server (pid %d); it is restarted if it dies", self.pid)

    def stop(self) -> None:
        """No more restarts; the GCS now running keeps running."""
        with self._lock:
            self._watching = False

    def close(self) -> None:
        """Stop, and end the GCS this watchdog started (SIGTERM, then SIGKILL after 5 s)."""
        self.stop()
        child = self._child
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(timeout=5.0)
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    def _alive(self) -> bool:
        if self._child is not None:
            return self._child.poll() is None  # reaps it once dead
        return self.image.alive()

    def _run(self) -> None:
        while not self._closed.wait(self.poll_interval_s):
            if not self._watching or self._alive():
                continue
            dead_pid = self.pid
            last = self._last_attempt
            uptime_s = None if last is None else time.monotonic() - last
            self._delay_s = next_restart_delay_s(uptime_s, self._delay_s)
            logger.warning(
                "the GCS server (pid %d) is gone; starting it again in %.1f s",
                dead_pid,
                self._delay_s,
            )
            if self._closed.wait(self._delay_s):
                return
            with self._lock:  # stop() may have come during the wait
                if self._watching:
                    self._spawn(dead_pid)

    def _spawn(self, dead_pid: int) -> None:
        self._last_attempt = time.monotonic()
        try:
            self._child = subprocess.Popen(
                self.argv,
                env=self.image.env,
                cwd=self.image.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # it writes its own log files (--stdout_filepath)
                stderr=subprocess.DEVNULL,
                preexec_fn=self._child_setup,
            )
        except OSError as exc:
            logger.error("the GCS server could not be started again: %s", exc)
            return
        self.restarts += 1
        logger.warning(
            "GCS server restarted as pid %d (restart %d; it replaces pid %d)",
            self._child.pid,
            self.restarts,
            dead_pid,
        )
