"""The whole serving config: YAML -> typed, validated pydantic models.

Errors name the field at fault (``models.0.batching.max_batch_size: ...``). With no file,
``default_config()`` serves the bundled ``minilm`` on 127.0.0.1:8000.

    config = load_config(Path("loom.yaml"))
    config.models[0].batching.max_batch_size
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    ValidationError,
    model_validator,
)

from models.bundled import BUNDLED_EMBEDDING_MODEL
from models.settings import LoomEnv
from serving.config.cluster import GATEWAY_RESOURCE, ClusterConfig
from serving.config.control_plane import ControlPlaneConfig
from serving.config.key_file import KeyFileError, read_key_file
from serving.config.model import (
    ENTRY_TAGS,
    DeployedEntry,
    EnsembleEntry,
    ModelConfig,
    ModelEntry,
    PoolConfig,
    ServedEntry,
)
from serving.config.monitoring import MonitoringConfig
from serving.config.pool import PoolMember
from serving.config.ray_head import RayConfig
from serving.config.server import ServerConfig


class ConfigError(ValueError):
    """The config file is missing, not YAML, or fails validation; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RolloutConfig(_Strict):
    poll_interval_s: float = Field(
        0.5, gt=0, le=60, description="How often the reconciler reads the store's aliases."
    )
    drain_timeout_s: float = Field(
        75.0,
        gt=0,
        description="Longest an old version keeps running after traffic left it, for requests "
        "still in flight (streams included); keep it above server.request_timeout_s.",
    )


class TrainingConfig(_Strict):
    enabled: bool = Field(
        True, description="Run the job scheduler beside the server and mount /v1/jobs."
    )
    cpus: float | None = Field(
        None,
        ge=0,
        description="CPUs set aside for training jobs: a local Ray started by `loom serve` adds "
        "this many beside the serving replicas' own, and a job whose workers x resources.cpu is "
        "larger is refused at submit (422 on resources.cpu); None: as many as the machine has "
        "on a local Ray, the cluster's total on a cluster (whose nodes say what they hold).",
    )
    gpus: float | None = Field(
        None,
        ge=0,
        description="GPUs a local Ray offers to training jobs, and the most one job may reserve "
        "(else 422 on resources.gpu); None: Ray's count.",
    )
    tick_s: float = Field(
        0.5, gt=0, le=60, description="How often the scheduler looks at the queue unprompted."
    )
    max_placement_wait_s: float = Field(
        600.0,
        gt=0,
        description="Longest the head of the queue may wait for the cluster to place its "
        "reservation; past it the job is failed with the reason, and the jobs behind it go on "
        "(the head is never overtaken, so a job that cannot be placed would stop the queue).",
    )
    retention_days: float = Field(
        7.0,
        gt=0,
        description="Days a finished job's events, log lines and workspace files are kept "
        "after it finished; the scheduler sweeps older ones (every 10 minutes), keeping the "
        "job's row (its state, metrics and error).",
    )
    max_active_jobs: int | None = Field(
        16,
        ge=1,
        description="Jobs one principal may have queued or running at once; past it a submit "
        "is answered 429 job_quota_exceeded with Retry-After. Admin keys (so also the keyless "
        "local mode, whose one caller holds every scope) are not bound. None: no bound.",
    )
    max_priority: int = Field(
        50,
        ge=0,
        le=100,
        description="The highest priority (0-100) a job may ask without the admin scope; "
        "past it the submit is refused, 422 on the priority field.",
    )
    webhook_allowed_networks: tuple[IPvAnyNetwork, ...] = Field(
        (),
        description="Networks (CIDR, e.g. 127.0.0.1/32, 10.20.0.0/16) a job's webhook_url may "
        "reach although they are not public. Webhooks to loopback, private, link-local (the "
        "cloud metadata address included), multicast and reserved addresses are refused, at "
        "submit (422) and again at delivery, unless their network is listed here. Default: "
        "none.",
    )


def ensemble_problems(models: Sequence[ModelConfig | PoolConfig | EnsembleEntry]) -> list[str]:
    """Member checks that need the whole config, each naming its field: every member is a
    callable served name (a plain model or a pool member) of the ensemble's task, not a
    pool's own name and not another ensemble."""
    plain = {m.name: m for m in models if isinstance(m, ModelConfig)}
    pools = {m.name: m for m in models if isinstance(m, PoolConfig)}
    pool_members = {member: pool for pool in pools.values() for member in pool.members}
    ensembles = {m.name for m in models if isinstance(m, EnsembleEntry)}
    problems = []
    for i, model in enumerate(models):
        if not isinstance(model, EnsembleEntry):
            continue
        where = f"models.{i}.ensemble.members"
        for member in model.ensemble.members:
            if member in ensembles:
                problems.append(f"{where}: {member} is an ensemble; members are served models")
                continue
            if member in pools:
                problems.append(
                    f"{where}: {member} is a pool's name, which is not callable; name its members"
                )
                continue
            target = plain.get(member) or pool_members.get(member)
            if target is None:
                problems.append(f"{where}: {member} is not a model of this config")
            elif target.task != model.task:
                problems.append(
                    f"{where}: {member} is a {target.task} model; this ensemble is {model.task}"
                )
    return problems


class LoomConfig(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    models: tuple[ModelEntry, ...] = Field(min_length=1)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    control_plane: ControlPlaneConfig = Field(default_factory=ControlPlaneConfig)
    cluster: ClusterConfig | None = Field(
        None,
        description="How Loom runs on Kubernetes (KubeRay): images, pods, storage, secrets. "
        "Read by `loom deploy` and `loom serve --in-cluster`; a local `loom serve` ignores it.",
    )

    @model_validator(mode="after")
    def _names_unique(self) -> LoomConfig:
        names = [m.name for m in self.models]
        names += [member for m in self.pools() for member in m.members]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(
                f"model and pool member names must be unique; repeated: {', '.join(dupes)}"
            )
        return self

    @model_validator(mode="after")
    def _ensemble_members_served(self) -> LoomConfig:
        problems = ensemble_problems(self.models)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def deployed(self) -> tuple[DeployedEntry, ...]:
        """The entries with a deployment (an ensemble has none: it calls its members)."""
        return tuple(m for m in self.models if isinstance(m, ModelConfig | PoolConfig))

    def pools(self) -> tuple[PoolConfig, ...]:
        return tuple(m for m in self.models if isinstance(m, PoolConfig))

    def ensembles(self) -> tuple[EnsembleEntry, ...]:
        return tuple(m for m in self.models if isinstance(m, EnsembleEntry))

    def model(self, name: str) -> ModelConfig | PoolConfig | EnsembleEntry | None:
        """The config entry ``name`` (a pool too): what is deployed and routed."""
        return next((m for m in self.models if m.name == name), None)

    def pool_members(self) -> dict[str, PoolMember]:
        """Member name -> its pool, over every pool."""
        return {
            name: PoolMember(name=name, ref=ref, pool=m.name)
            for m in self.pools()
            for name, ref in m.members.items()
        }

    def served_names(self) -> tuple[str, ...]:
        """What clients may call: every model but a pool, and every pool's members."""
        plain = [m.name for m in self.models if not isinstance(m, PoolConfig)]
        return (*plain, *self.pool_members())

    def served(self, name: str) -> ServedEntry | None:
        """The config a callable name is served by: its own entry, or for a pool member its
        pool's settings under the member's name and pinned ref; None for a pool's name."""
        for pool in self.pools():
            if name in pool.members:
                return pool.member(name)
        model = self.model(name)
        return None if isinstance(model, PoolConfig) else model


def in_cluster(config: LoomConfig) -> LoomConfig:
    """``config`` as the control plane runs it in the cluster its ``cluster:`` section
    describes (``loom serve --in-cluster``, the head pod's command): one gateway per gateway
    pod on all interfaces (keys required, as anywhere off loopback), and sidecars that are
    containers at ``cluster.sidecar_port`` reading the pod-local ``cluster.stats_dir``.
    ``ConfigError`` without the section."""
    cluster = config.cluster
    if cluster is None:
        raise ConfigError("--in-cluster needs the config's cluster: section (docs/deploy.md)")
    server = config.server.model_copy(
        update={
            "host": "0.0.0.0",
            "gateway_replicas": cluster.gateway.replicas,
            "gateway_node_resource": GATEWAY_RESOURCE,
        }
    )
    monitoring = config.monitoring.model_copy(
        update={
            "sidecar_actor": False,
            "sidecar_host": "0.0.0.0",
            "sidecar_port": cluster.sidecar_port,
            "stats_dir": Path(cluster.stats_dir),
        }
    )
    return config.model_copy(update={"server": server, "monitoring": monitoring})


MAX_DEFAULT_REPLICAS = 8


def default_config(cpus: int | None = None) -> LoomConfig:
    """The embedded default: the bundled MiniLM on 127.0.0.1:8000, one single-threaded replica
    per core (at most 8).

    For a model this small, replicas beat threads: on 2 cores, 2 replicas x 1 torch thread
    gave ~200-225 texts/s at concurrency 64 and ~25 ms p50 at concurrency 1 (p99 ~35 ms),
    where 1 replica x 2 threads gave ~170-205 and ~30-40 ms (p99 up to ~180 ms): a 2-thread
    engine stalls whenever the gateway or Ray takes one of its cores.
    """
    cpus = cpus or os.cpu_count() or 1
    minilm = ModelConfig(
        name=BUNDLED_EMBEDDING_MODEL,
        source=BUNDLED_EMBEDDING_MODEL,
        task="embed",
        replicas=min(cpus, MAX_DEFAULT_REPLICAS),
        num_cpus=1,
        torch_threads=1,
    )
    return LoomConfig(models=(minilm,))


def _where(loc: tuple[int | str, ...]) -> str:
    """``models.0.batching.max_batch_size``: the entry union's tag (``models.0.pool...``) is
    pydantic's, not the user's, so it is left out."""
    parts = list(loc)
    tagged = len(parts) > 2 and parts[0] == "models" and isinstance(parts[1], int)
    if tagged and parts[2] in ENTRY_TAGS:
        del parts[2]
    return ".".join(str(p) for p in parts) or "(top level)"


def parse_config(data: object) -> LoomConfig:
    """Validate already-parsed YAML/JSON data; errors name each failing field."""
    try:
        return LoomConfig.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # a bad entry also fails ``models``' min_length (pydantic counts what validated): noise
        if any(len(e["loc"]) > 1 and e["loc"][0] == "models" for e in errors):
            errors = [e for e in errors if e["loc"] != ("models",) or e["type"] != "too_short"]
        problems = [f"{_where(err['loc'])}: {err['msg']}" for err in errors]
        raise ConfigError("invalid config: " + "; ".join(problems)) from None


def load_config(path: Path) -> LoomConfig:
    """Read a YAML config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    return parse_config(data)


def with_overrides(
    config: LoomConfig, *, env: LoomEnv, host: str | None = None, port: int | None = None
) -> LoomConfig:
    """Apply command-line and environment overrides, then enforce the bind rule."""
    server = config.server
    keys = tuple(dict.fromkeys((*server.api_keys, *env.api_keys)))
    try:
        filed = read_key_file(env.keys_file)
        # validated again, so a short LOOM_API_KEYS key or a repeated name is refused here
        server = ServerConfig.model_validate(
            {
                **server.model_dump(),
                "host": host or server.host,
                "port": port or server.port,
                "api_keys": keys,
                "keys": (*server.keys, *filed),
            }
        )
    except KeyFileError as exc:
        raise ConfigError(f"invalid keys: {exc}") from None
    except ValidationError as exc:  # the messages only: an input value may be a key
        problems = [f"server.{_where(err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise ConfigError("invalid keys: " + "; ".join(problems)) from None
    if not server.is_loopback and not server.keys_on:
        raise ConfigError(
            f"refusing to bind {server.host} without API keys: set server.api_keys in the "
            "config or LOOM_API_KEYS, or bind 127.0.0.1"
        )
    return config.model_copy(update={"server": server})
