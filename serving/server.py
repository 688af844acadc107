"""Build and run Loom on Ray Serve: the Gateway application, one application per model
version, and the rollout reconciler that keeps the versions in step with the store's aliases.

server = LoomServer(config, env)
server.start()   # a local Ray if none runs, the apps, HTTP on host:port; waits until ready
...
server.stop()    # the reconciler, Serve, then the Ray it started: nothing left running

A start first cleans up after a run on the same home that was killed instead of stopped
(``serving.run_record``): its Ray session's leftover processes, its runtime files.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import time
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.actor import ActorHandle
from ray.serve.config import HTTPOptions

from models.bundled import ensure_bundled
from models.errors import StoreError
from models.refs import ModelRef
from models.settings import LoomEnv
from models.store import ModelStore
from serving.audit import AUDIT_FILE_NAME
from serving.autoscaling.pollers import Source
from serving.config import ConfigError, LoomConfig, ModelConfig
from serving.config.ray_head import SERVE_ENV, joins_a_cluster
from serving.control_plane import ControlPlane, lease_backend
from serving.gateway.deployment import Gateway
from serving.gateway.http_server import bind_socket
from serving.gateway.keys import hash_server_keys
from serving.gateway.readiness import APP_NAME
from serving.gcs_fault_tolerance import (
    GcsWatchdog,
    delete_namespace,
    head_env,
    redis_reachable,
    storage_namespace,
)
from serving.monitoring.sidecar_actor import ReplicaMonitoring, stop_sidecars
from serving.rollout.plan import AppState, follows_alias
from serving.rollout.reconciler import ActorBoard, Reconciler, ServeVersionApps
from serving.rollout.route_table import open_board
from serving.rollout.serve_status import read_serve_apps
from serving.run_record import RunRecord, RunRecords
from training.leases import Term
from training.runner import RunnerSettings
from training.scheduler import SchedulerService, start_scheduler, stop_scheduler

logger = logging.getLogger(__name__)

BOARD_NAME = "loom-routes"
"""The named actor holding the route table (namespace ``loom``)."""


def with_stats_dir(config: LoomConfig, env: LoomEnv) -> LoomConfig:
    """``config`` with ``monitoring.stats_dir`` resolved (default ``$LOOM_HOME/run/stats``),
    so the gateway, the replicas and the policy name one folder."""
    monitoring = config.monitoring
    if monitoring.stats_dir is not None:
        return config
    stats_dir = env.run_dir / "stats"
    return config.model_copy(
        update={"monitoring": monitoring.model_copy(update={"stats_dir": stats_dir})}
    )


def replica_monitoring(config: LoomConfig) -> ReplicaMonitoring:
    """Where every replica reports its stats, and its node's sidecar."""
    monitoring = config.monitoring
    return ReplicaMonitoring(
        stats_dir=str(monitoring.stats_dir),
        sidecar_host=monitoring.sidecar_host,
        sidecar_port=monitoring.sidecar_port,
        interval_s=monitoring.stats_interval_s,
        start_actor=monitoring.sidecar_actor,
    )


def scaling_source(config: LoomConfig) -> Source:
    """Where an autoscaled model's policy reads its signals."""
    monitoring = config.monitoring
    url = monitoring.prometheus_url
    return Source(
        stats_dir=str(monitoring.stats_dir),
        prometheus_url=None if url is None else str(url),
        interval_s=monitoring.poll_interval_s,
        window_s=monitoring.rate_window_s,
        sidecar_port=monitoring.sidecar_port,
        sidecar_actors=monitoring.sidecar_actor,
    )


def build_application(
    config: LoomConfig, env: LoomEnv, *, local_ray: bool = False
) -> serve.Application:
    """The gateway application. Model versions are applications of their own, deployed by the
    reconciler (``serving.rollout.reconciler``); the gateway finds them in the route table on
    the board ``BOARD_NAME``, so a rollout never redeploys (restarts) the gateway.
    ``local_ray``: Loom started the Ray it runs on (``training_cpus``)."""
    server = config.server
    placement: dict[str, Any] = {"num_cpus": 0}
    if server.gateway_node_resource is not None:  # one per node that offers one (its port)
        placement["resources"] = {server.gateway_node_resource: 1}
    gateway = serve.deployment(
        name="gateway",
        num_replicas=server.gateway_replicas,
        max_ongoing_requests=4096,  # admission happens per model, behind the gateway
        ray_actor_options=placement,
    )(Gateway)
    jobs = None
    if config.training.enabled:
        jobs = {
            "db_url": env.db_url,
            "dataset_roots": [str(p) for p in env.dataset_roots],
            "webhook_allowed_networks": allowed_networks(config),
            "training_cpus": training_cpus(config, local_ray=local_ray),
            "training_gpus": config.training.gpus,
        }
    audit_log = str(env.home / AUDIT_FILE_NAME)  # serving.audit: state-changing calls
    return gateway.bind(
        gateway_config(config), str(env.models_dir), BOARD_NAME, jobs=jobs, audit_log=audit_log
    )


def gateway_config(config: LoomConfig) -> dict[str, Any]:
    """The config the gateway deployment is given: its keys replaced by salted digests
    (``gateway.keys``), so no key is in Ray's state (the deployment's arguments)."""
    server = hash_server_keys(config.server)
    return config.model_copy(update={"server": server}).model_dump()


def plaintext_warning(config: LoomConfig) -> str | None:
    """What to warn of when the gateway listens beyond this machine without TLS; None when it
    binds loopback or serves HTTPS."""
    server = config.server
    if server.is_loopback or server.tls is not None:
        return None
    return (
        f"serving plain HTTP on {server.host}: API keys and request data cross the network "
        "in clear; set server.tls (certfile, keyfile) or bind 127.0.0.1 behind a TLS proxy"
    )


def training_cpus(config: LoomConfig, *, local_ray: bool) -> float | None:
    """The CPUs one job may reserve at most: ``training.cpus``; unset, on a local Ray the
    machine's count (what ``required_cpus`` adds beside serving's), on a cluster None (its
    whole total). A job asking for more is refused at submit: it could never be placed."""
    if config.training.cpus is not None:
        return config.training.cpus
    return float(os.cpu_count() or 1) if local_ray else None


def allowed_networks(config: LoomConfig) -> list[str]:
    """``training.webhook_allowed_networks`` as CIDR strings, for the gateway and scheduler."""
    return [str(network) for network in config.training.webhook_allowed_networks]


def ray_serve_env() -> dict[str, str]:
    """Ray Serve settings Loom runs with when it starts Ray itself (read by every Ray process
    at start, so they go into the environment before ``ray.init``; a value already set wins).

    ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` runs user code and the handle router on the replica's
    own event loop (where the gateway's HTTP server runs too), uses gRPC between deployments
    and buffers request logs. Side by side in one benchmark run: 186 vs 169 req/s at
    concurrency 64, the same p50 at concurrency 1 within noise. Its direct ingress is switched
    off: the gateway serves HTTP itself (``serving.http_server``).
    """
    return dict(SERVE_ENV)


def check_sources(config: LoomConfig, store: ModelStore) -> list[str]:
    """The configured models whose source does not resolve in the store yet (no version
    registered, an alias not set, a version a split or a pool names missing): they start not
    ready and serve once it resolves (the reconciler polls). Not an error: configuring a model
    before training its first version is the usual first step. Raises ``ConfigError`` for what
    no later version can fix: a pool member stored as a model of another task."""
    waiting = []
    for model in config.deployed():
        refs = (
            list(model.multiplex.models)  # a pool: each member's pinned ref
            if not isinstance(model, ModelConfig)
            else [model.source]
            + [f"{ModelRef.parse(model.source).name}@{v}" for v in sorted(model.traffic or {})]
        )
        for ref in refs:
            try:
                resolved = store.resolve(ref)
            except StoreError:  # the reconciler says so, once, and starts it when it resolves
                waiting.append(model.name)
                break
            if not isinstance(model, ModelConfig) and resolved.task != model.task:
                raise ConfigError(
                    f"pool {model.name} serves {model.task}; member {ref} is a "
                    f"{resolved.task} model"
                )
    return waiting


def required_cpus(config: LoomConfig) -> int:
    """Logical CPUs a local Ray needs so every replica can be placed: 2 x 1.0 -> 2, and as
    many again for a model that follows an alias (a new version starts beside the old one),
    once per version of a traffic split: 2 replicas x 1.0, following an alias -> 4. Training
    jobs get ``training.cpus`` more (default: the machine's count), so a job never waits on
    a serving replica's reservation: 2 for serving + 2 for training on a 2-core machine -> 4."""
    total = 0.0
    for m in config.deployed():  # an ensemble reserves nothing: its members do
        traffic = m.traffic if isinstance(m, ModelConfig) else None
        copies = len(traffic) if traffic else (2 if follows_alias(m) else 1)
        # a sharded entry: each shard holds its replicas, and one shard more fits so a local
        # Ray can reshard S -> S+1 (4 shards x 1 replica x 0.5 CPU -> 2.5)
        shards = m.sharding.shards + 1 if m.sharding else 1
        total += m.num_cpus * m.max_replicas * copies * shards
    serving = max(int(total + 0.999), os.cpu_count() or 1)
    training = config.training
    if not training.enabled:
        return serving
    extra = training.cpus if training.cpus is not None else (os.cpu_count() or 1)
    return serving + int(extra + 0.999)


def runner_settings(env: LoomEnv) -> RunnerSettings:
    return RunnerSettings(
        db_url=env.db_url, models_dir=str(env.models_dir), jobs_dir=str(env.jobs_dir)
    )


class LoomServer:
    def __init__(self, config: LoomConfig, env: LoomEnv) -> None:
        config = with_stats_dir(config, env)
        self.config = config
        self.env = env
        self._started_ray = False
        self._board: Any = None  # the route board actor
        self._scheduler: ActorHandle[SchedulerService] | None = None
        self.reconciler: Reconciler | None = None
        self.control_plane: ControlPlane | None = None
        self.run_records = RunRecords(env.run_dir)
        self.gcs_watchdog: GcsWatchdog | None = None
        self._gcs_env: dict[str, str] = {}  # set for the Ray it starts; taken back at stop

    def prepare(self) -> None:
        """Check the port is free and no pool mixes tasks (registering the bundled model on
        first start), before any Ray process starts. A model whose source does not resolve
        yet is not a reason to stop: it waits."""
        server = self.config.server
        self.run_records.clean_dead_runs()  # a killed run's leftovers may hold the port
        if not joins_a_cluster():  # joining: the port may be the running gateway's, rightly
            for port in server.listen_ports:  # a taken port: a clear error, now
                bind_socket(server.host, port).close()
        store = ModelStore(self.env.models_dir)  # opening it clears killed registrations
        try:
            ensure_bundled(store)
        except StoreError as exc:  # a broken minilm folder: it waits (if served), others serve
            logger.warning("the bundled model could not be registered or read: %s", exc)
        check_sources(self.config, store)

    def start(self, *, ready_timeout_s: float = 600.0) -> None:
        self.prepare()
        server = self.config.server
        warning = plaintext_warning(self.config)
        if warning is not None:
            logger.warning("%s", warning)
        stats_dir = Path(str(self.config.monitoring.stats_dir))
        stats_dir.mkdir(parents=True, exist_ok=True)
        if not ray.is_initialized() and joins_a_cluster():
            # RAY_ADDRESS: the cluster says what it holds; a second `loom serve` joins the
            # first's cluster this way and stands by (``serving.control_plane``)
            ray.init(log_to_driver=False, configure_logging=False)
            session_dir = None  # a Ray it joined is not its to clean
        elif not ray.is_initialized():
            for key, value in ray_serve_env().items():
                os.environ.setdefault(key, value)
            self._use_gcs_redis()
            gpus = None if self.config.training.gpus is None else int(self.config.training.gpus)
            context = ray.init(
                num_cpus=required_cpus(self.config),
                num_gpus=gpus,  # None: Ray counts them
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                # Ray nices its workers to 15 by default; model replicas are the workload here
                _system_config={"worker_niceness": 0},
            )
            self._started_ray = True
            node_ip = ray.util.get_node_ip_address()
            if server.is_loopback and not ipaddress.ip_address(node_ip).is_loopback:
                logger.info("Ray's ports listen on %s (this node's address)", node_ip)
            # a RayContext here (Ray types ray.init's answer as its base class)
            address_info: dict[str, Any] = getattr(context, "address_info", {})
            session_dir = address_info.get("session_dir")
            if self._gcs_env and session_dir:
                gcs_port = int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
                self.gcs_watchdog = GcsWatchdog.for_session(session_dir, gcs_port)
                if self.gcs_watchdog is not None:
                    self.gcs_watchdog.start()
        else:
            session_dir = None  # a Ray it joined is not its to clean
        # written before anything slow: a kill from here on leaves what the next start cleans
        self.run_records.write(
            RunRecord.for_this_process(
                port=server.port, ray_session_dir=session_dir, metrics_dir=str(stats_dir)
            )
        )
        if server.ingress == "direct":  # the gateway serves HTTP itself: no proxy actor
            serve.start(proxy_location="Disabled")
        else:
            tls = server.tls
            serve.start(
                http_options=HTTPOptions(
                    host=server.host,
                    port=server.port,
                    ssl_certfile=tls.certfile if tls else None,
                    ssl_keyfile=tls.keyfile if tls else None,
                )
            )
        self.control_plane = ControlPlane(
            self.config.control_plane,
            lease_backend(self.config.control_plane, self.env.db_url),
            take_over=functools.partial(self._take_over, ready_timeout_s=ready_timeout_s),
            step_down=self._step_down,
        )
        self.control_plane.start()
        self._wait_for_a_role(ready_timeout_s)

    def _wait_for_a_role(self, timeout_s: float) -> None:
        """Until this server holds the control plane and serves, or stands by for another
        that holds it; the take-over's error if it failed, ``TimeoutError`` past
        ``timeout_s``."""
        plane = self.control_plane
        assert plane is not None
        deadline = time.monotonic() + timeout_s
        while not plane.ready.wait(0.1):
            if plane.failed is not None:
                raise plane.failed
            if plane.term is None and plane.role == "standby":
                logger.info(
                    "standing by: %s holds the control plane", plane.current_holder() or "?"
                )
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"not serving within {timeout_s:.0f} s")

    @property
    def role(self) -> str:
        """``holder`` (this server reconciles and schedules), ``standby`` or ``starting``."""
        return "starting" if self.control_plane is None else self.control_plane.role

    def _take_over(self, term: Term, *, ready_timeout_s: float) -> None:
        """Run the control plane under ``term``: the route board, the reconciler (its first
        versions), the gateway (unless it runs: a standby taking over leaves it be) and the
        scheduler, each fenced by the term's epoch."""
        started = time.monotonic()
        store = ModelStore(self.env.models_dir)
        self._board = open_board(BOARD_NAME)
        rollout = self.config.rollout
        reconciler = Reconciler(
            self.config.deployed(),  # an ensemble is not deployed: the gateway calls its members
            resolve=lambda source: store.resolve(source).version,
            apps=ServeVersionApps(
                self.config.deployed(),
                monitoring=replica_monitoring(self.config),
                scaling=scaling_source(self.config),
                models_dir=str(self.env.models_dir),
                drain_timeout_s=rollout.drain_timeout_s,
            ),
            board=ActorBoard(self._board, term=term.epoch),
            poll_interval_s=rollout.poll_interval_s,
            drain_timeout_s=rollout.drain_timeout_s,
            on_event=logger.info,
        )
        self.reconciler = reconciler
        reconciler.step()  # the first versions start loading beside the gateway
        gateway = read_serve_apps().get(APP_NAME)
        if gateway is None or gateway.state != AppState.RUNNING:
            app = build_application(self.config, self.env, local_ray=self._started_ray)
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)  # waits: RUNNING
        reconciler.wait_until_serving(ready_timeout_s - (time.monotonic() - started))
        reconciler.start()
        if self.config.training.enabled:
            self.env.jobs_dir.mkdir(parents=True, exist_ok=True)
            self._scheduler = start_scheduler(
                runner_settings(self.env),
                tick_s=self.config.training.tick_s,
                webhook_allowed_networks=allowed_networks(self.config),
                max_placement_wait_s=self.config.training.max_placement_wait_s,
                retention_days=self.config.training.retention_days,
                term=term,
                lease_backend=self.config.control_plane.lease_backend,
            )

    def _step_down(self) -> None:
        """The term is over: stop reconciling and scheduling now (what they would still write
        is refused by the fences anyway). The gateway, the version apps and running jobs stay:
        the next holder takes them over."""
        if self.reconciler is not None:
            self.reconciler.stop()
            self.reconciler = None
        if self._scheduler is not None and ray.is_initialized():
            stop_scheduler(self._scheduler)
            self._scheduler = None

    def _use_gcs_redis(self) -> None:
        """With ``ray.gcs_redis_address`` set: the environment that makes the head about to
        start keep its GCS in Redis, under this server's namespace, after removing what a
        killed run on the same home and port left there (no server of it runs now: ``prepare``
        found its port free)."""
        redis = self.config.ray.gcs_redis()
        if redis is None:
            return
        if not redis_reachable(redis):
            raise RuntimeError(
                f"ray.gcs_redis_address: no Redis answers at {redis.url()} (GCS fault tolerance)"
            )
        namespace = storage_namespace(self.env.home, self.config.server.port)
        delete_namespace(redis, namespace)
        self._gcs_env = head_env(redis, namespace)
        os.environ.update(self._gcs_env)
        logger.info("Ray's GCS keeps its state in Redis at %s (%s)", redis.url(), namespace)

    def _drop_gcs_state(self) -> None:
        """After Ray has stopped: end a restarted GCS, remove this server's keys in Redis."""
        if self.gcs_watchdog is not None:
            self.gcs_watchdog.close()
            self.gcs_watchdog = None
        redis = self.config.ray.gcs_redis()
        namespace = self._gcs_env.get("RAY_external_storage_namespace")
        if redis is not None and namespace is not None and delete_namespace(redis, namespace):
            logger.info("removed the GCS state of %s from Redis", namespace)
        for key in self._gcs_env:
            os.environ.pop(key, None)
        self._gcs_env = {}

    def stop(self) -> None:
        """Stop the stack: a holder (or a server that started its own Ray) ends Serve, the
        board and the sidecars; a standby only stops contending."""
        plane, self.control_plane = self.control_plane, None
        held = plane is not None and plane.term is not None
        try:
            self._step_down()  # no more reconciling or scheduling from here
            if ray.is_initialized() and (held or plane is None or self._started_ray):
                serve.shutdown()
                if self._board is not None:
                    ray.kill(self._board)
                stop_sidecars(str(self.config.monitoring.stats_dir))
        finally:
            if plane is not None:  # released once the stack is down: a standby starts it anew
                plane.stop()
            self._board = None
            if self.gcs_watchdog is not None:
                self.gcs_watchdog.stop()  # Ray's shutdown ends the GCS: not to be restarted
            if self._started_ray and ray.is_initialized():
                ray.shutdown()
            self._drop_gcs_state()
            self.run_records.remove(self.config.server.port)  # stopped: nothing to clean
