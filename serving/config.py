"""Serving configuration: YAML -> typed, validated pydantic models.

Errors name the field at fault (``models.0.batching.max_batch_size: ...``). With no file,
``default_config()`` serves the bundled ``minilm`` on 127.0.0.1:8000.

    config = load_config(Path("loom.yaml"), env=LoomEnv.from_environ())
    config.models[0].batching.max_batch_size
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.bundled import BUNDLED_EMBEDDING_MODEL
from models.errors import InvalidModelRef
from models.refs import ModelRef, validate_name
from models.settings import LoomEnv
from serving.ensemble_config import EnsembleConfig, ensemble_problems, entry_problem
from serving.faults import FaultsConfig
from serving.sharding import ShardingConfig

Task = Literal["embed", "generate", "classify"]
POOL_TASKS = ("classify", "embed")
"""Tasks a multiplexed pool may serve (their replicas batch rows; generation does not pool)."""
LOOPBACK_HOSTS = frozenset({"localhost"})


class ConfigError(ValueError):
    """The config file is missing, not YAML, or fails validation; the message names the field."""


def _parse_ref(value: str) -> ModelRef:
    try:
        return ModelRef.parse(value)
    except InvalidModelRef as exc:  # pydantic reports ValueErrors against the field
        raise ValueError(str(exc)) from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    host: str = Field("127.0.0.1", description="Address the HTTP server binds.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    api_keys: tuple[str, ...] = Field(
        (),
        description="Bearer keys; when any are set every route but health and metrics needs one.",
    )
    admin_api_keys: tuple[str, ...] = Field(
        (),
        description="Bearer keys that may also use /v1/admin routes (any route, too). With keys "
        "on, an admin route refuses an ordinary key with 403; with no keys at all it is open.",
    )
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="Requests with a larger body are refused with 413."
    )
    ingress: Literal["direct", "proxy"] = Field(
        "direct",
        description="direct: the gateway replica serves HTTP itself (no proxy hop, none of "
        "Serve's per-request ingress layers); proxy: through Ray Serve's HTTP proxy.",
    )
    request_timeout_s: float = Field(
        60.0, gt=0, description="Deadline for one inference request; past it the answer is 504."
    )

    @property
    def keys_on(self) -> bool:
        """True when any route but health and metrics needs a key."""
        return bool(self.api_keys or self.admin_api_keys)

    @property
    def is_loopback(self) -> bool:
        if self.host in LOOPBACK_HOSTS:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class AutoscalingConfig(_Strict):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas kept running.")
    max_replicas: int = Field(2, ge=1, description="Most replicas the autoscaler may start.")
    target_ongoing_requests: float = Field(
        32.0, gt=0, description="Requests in flight per replica the autoscaler aims for."
    )

    @model_validator(mode="after")
    def _min_below_max(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


class BatchingConfig(_Strict):
    max_batch_size: int = Field(
        64,
        ge=1,
        le=1024,
        description="Most inputs in one engine run (64: MiniLM's best on 2 CPU cores).",
    )
    max_wait_ms: float = Field(
        10.0,
        ge=0,
        le=1000,
        description="Longest a free engine holds a partial batch back for more inputs; only "
        "waited when the arrival rate says more are due within it (a lone request runs at once).",
    )


class LimitsConfig(_Strict):
    max_inputs: int = Field(256, ge=1, description="Most inputs in one request (else 413).")
    max_input_chars: int = Field(
        20_000, ge=1, description="Longest single input in characters (else 413)."
    )
    max_queued: int = Field(
        1024, ge=1, description="Inputs a replica admits before answering 503 with Retry-After."
    )


class GenerationSettings(_Strict):
    """How a generate model's replica batches sequences (transformers' continuous batching)."""

    max_sequences: int = Field(
        32, ge=1, le=1024, description="Most sequences decoding together in one replica."
    )
    max_batch_tokens: int = Field(
        1024,
        ge=16,
        description="Most tokens in one step: prompt chunks being prefilled plus one per "
        "decoding sequence.",
    )
    kv_cache_tokens: int | None = Field(
        None,
        ge=64,
        description="KV cache size in tokens; default: max_sequences full contexts.",
    )
    stream_interval_ms: float = Field(
        100.0,
        ge=0,
        le=1000,
        description="After a choice's first text, stream at most one chunk per this interval "
        "(0: one per decoding step). Fewer, fuller chunks cost less: on 2 cores, 32 streams "
        "of a 10M GPT-2 gave ~650 tokens/s at 0 and ~930 at 100 ms; 8 streams ~390 and ~600.",
    )


class MultiplexConfig(_Strict):
    """Many small variants of one family sharing replicas (Ray Serve model multiplexing).

    A replica loads a member on its first request and keeps at most ``max_models_per_replica``
    of them, evicting the least recently used. A digits classifier costs ~457 MiB and ~4.6 s
    as a replica of its own here, ~3 ms to load into one that runs already.
    """

    models: tuple[str, ...] = Field(
        min_length=1,
        description="Pinned store refs of the members, NAME@VERSION (e.g. digits-a@2); clients "
        "call each by its store name (digits-a). Resolved at start: members do not follow "
        "aliases yet.",
    )
    max_models_per_replica: int = Field(
        8, ge=1, le=1024, description="Most members one replica holds loaded (LRU eviction)."
    )

    @field_validator("models")
    @classmethod
    def _members_pinned_and_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        names = []
        for text in value:
            ref = _parse_ref(text)
            if ref.version is None:
                raise ValueError(f"pool member {text} must be pinned: NAME@VERSION")
            names.append(ref.name)
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"pool members must be unique; repeated: {', '.join(dupes)}")
        return value

    @property
    def members(self) -> dict[str, str]:
        """Member name -> its pinned ref: ``{"digits-a": "digits-a@2"}``."""
        return {ModelRef.parse(ref).name: ref for ref in self.models}


@dataclass(frozen=True, slots=True)
class PoolMember:
    """One callable member of a multiplexed pool."""

    name: str
    """What clients call it: the store name of ``ref``."""
    ref: str
    """The pinned store ref its replica loads (the multiplexed model id)."""
    pool: str
    """The pool's config name: the one routed entry, deployment and app."""


class ModelConfig(_Strict):
    name: str = Field(
        description="The name clients call the model by; a pool's name is not callable (its "
        "members are)."
    )
    source: str | None = Field(
        None,
        description="Store reference: NAME, NAME@VERSION or NAME#ALIAS; required, except for "
        "a pool (multiplex), which takes none.",
    )
    task: Task = Field("embed", description="What the model does.")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N.")
    dtype: str = Field("auto", description="auto, float32, float16 or bfloat16 (GPU only).")
    devices: tuple[str, ...] | None = Field(
        None,
        min_length=2,
        description="Split the model's layers across these devices inside each replica "
        "(pipeline stages, for a model too large for one device), e.g. [cuda:0, cuda:1]; "
        "inputs go to the first. Embed and text-classify models; a generate model takes one "
        "device repeated only. Reserve the GPUs with num_gpus.",
    )
    replicas: int | None = Field(1, ge=1, description="A fixed number of replicas.")
    autoscaling: AutoscalingConfig | None = Field(
        None, description="Autoscale between bounds instead of a fixed number."
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica (Ray resources).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica.")
    torch_threads: int | None = Field(
        None, ge=1, description="Intra-op threads per replica; default: num_cpus, at least 1."
    )
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    generation: GenerationSettings = Field(
        default_factory=GenerationSettings, description="Only for task generate."
    )
    traffic: dict[str, float] | None = Field(
        None,
        description='Canary split between pinned versions by weight, e.g. {"3": 90, "4": 10}; '
        "source then names the store model alone (NAME). Each version must exist at start.",
    )
    multiplex: MultiplexConfig | None = Field(
        None,
        description="Make this entry a pool: one deployment (replicas/autoscaling apply to it) "
        "whose replicas load the members on demand; task classify or embed.",
    )
    ensemble: EnsembleConfig | None = Field(
        None,
        description="Make this entry a scatter/gather ensemble over other served models (no "
        "source, no deployment of its own); task classify or embed.",
    )
    faults: FaultsConfig | None = Field(
        None,
        description="Inject delays or errors into this model's replicas, per call (testing, "
        "incident drills, tail-latency benchmarks); none by default.",
    )
    sharding: ShardingConfig | None = Field(
        None,
        description="Serve this entry as shards, each its own replicated deployment, placed by "
        "a consistent-hash ring over the model name (pools) or the X-Loom-Shard-Key header.",
    )

    @field_validator("name")
    @classmethod
    def _name_is_well_formed(cls, value: str) -> str:
        _parse_ref(value)  # same alphabet as the store: no slashes, no traversal
        if "@" in value or "#" in value:
            raise ValueError("a served name may not contain '@' or '#'")
        return value

    @field_validator("source")
    @classmethod
    def _source_is_a_store_ref(cls, value: str | None) -> str | None:
        if value is not None:
            _parse_ref(value)
        return value

    @field_validator("traffic")
    @classmethod
    def _traffic_is_weighted_versions(cls, value: dict[str, float] | None) -> dict | None:
        if value is None:
            return None
        if not value:
            raise ValueError("traffic needs at least one version")
        for version, weight in value.items():
            try:
                validate_name("version", version)
            except InvalidModelRef as exc:
                raise ValueError(str(exc)) from None
            if not 0 < weight < math.inf:
                raise ValueError(f"traffic weight of version {version} must be > 0, not {weight}")
        return value

    @model_validator(mode="after")
    def _sharding_fits(self) -> ModelConfig:
        if self.sharding is None:
            return self
        if self.ensemble is not None:
            raise ValueError("an ensemble has no deployment to shard; shard its members")
        if self.traffic is not None:
            raise ValueError("sharding and a traffic split cannot be combined")
        if self.sharding.key == "model" and self.multiplex is None:
            raise ValueError(
                "sharding.key model places each called model on a shard, so it needs a pool "
                "(multiplex) of many; one model would all go to one shard: use key header"
            )
        return self

    @model_validator(mode="after")
    def _pool_or_source(self) -> ModelConfig:
        problem = entry_problem(self)
        if problem is not None:
            raise ValueError(problem)
        if self.ensemble is not None:
            return self
        if self.multiplex is None:
            if self.source is None:
                raise ValueError("source is required (a store reference)")
            return self
        if self.task not in POOL_TASKS:
            raise ValueError(f"a pool (multiplex) serves task classify or embed, not {self.task}")
        if self.source is not None or self.traffic is not None:
            raise ValueError("a pool (multiplex) names its members there, not source or traffic")
        return self

    @model_validator(mode="after")
    def _traffic_names_the_model_alone(self) -> ModelConfig:
        if self.source is None:
            return self
        ref = _parse_ref(self.source)
        if self.traffic is not None and (ref.version is not None or ref.alias is not None):
            raise ValueError(
                "with traffic, source names the store model alone (NAME), not a version or alias"
            )
        return self

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> ModelConfig:
        if self.autoscaling is not None and self.replicas not in (None, 1):
            raise ValueError("give either replicas or autoscaling, not both")
        return self

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, round(self.num_cpus))


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
        description="Logical CPUs a local Ray started by `loom serve` adds for training jobs, "
        "beside the serving replicas' own; None: as many as the machine has. Ignored on a "
        "cluster, whose nodes say what they hold.",
    )
    gpus: float | None = Field(
        None, ge=0, description="GPUs a local Ray offers to training jobs; None: Ray's count."
    )
    tick_s: float = Field(
        0.5, gt=0, le=60, description="How often the scheduler looks at the queue unprompted."
    )


class LoomConfig(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    models: tuple[ModelConfig, ...] = Field(min_length=1)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)

    @model_validator(mode="after")
    def _names_unique(self) -> LoomConfig:
        names = [m.name for m in self.models]
        names += [member for m in self.models if m.multiplex for member in m.multiplex.members]
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

    def deployed(self) -> tuple[ModelConfig, ...]:
        """The entries with a deployment (an ensemble has none: it calls its members)."""
        return tuple(m for m in self.models if m.ensemble is None)

    def model(self, name: str) -> ModelConfig | None:
        """The config entry ``name`` (a pool too): what is deployed and routed."""
        return next((m for m in self.models if m.name == name), None)

    def pool_members(self) -> dict[str, PoolMember]:
        """Member name -> its pool, over every pool."""
        return {
            name: PoolMember(name=name, ref=ref, pool=m.name)
            for m in self.models
            if m.multiplex is not None
            for name, ref in m.multiplex.members.items()
        }

    def served_names(self) -> tuple[str, ...]:
        """What clients may call: every model but a pool, and every pool's members."""
        plain = [m.name for m in self.models if m.multiplex is None]
        return (*plain, *self.pool_members())

    def served(self, name: str) -> ModelConfig | None:
        """The config a callable name is served by: its own entry, or for a pool member its
        pool's settings under the member's name and pinned ref; None for a pool's name."""
        member = self.pool_members().get(name)
        if member is not None:
            pool = self.model(member.pool)
            assert pool is not None
            return pool.model_copy(update={"name": name, "source": member.ref, "multiplex": None})
        model = self.model(name)
        return model if model is not None and model.multiplex is None else None


MAX_DEFAULT_REPLICAS = 8


def default_config(cpus: int | None = None) -> LoomConfig:
    """The embedded default: the bundled MiniLM on 127.0.0.1:8000, one single-threaded replica
    per core (at most 8).

    For a model this small, replicas beat threads: on 2 cores, 2 replicas x 1 torch thread
    gave ~200-225 texts/s at concurrency 64 and ~25 ms p50 at concurrency 1 (p99 ~35 ms),
    where 1 replica x 2 threads gave ~170-205 and ~30-40 ms (p99 up to ~180 ms): a 2-thread
    engine stalls whenever the gateway or Ray takes one of its cores.
    """
    import os

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


def parse_config(data: object) -> LoomConfig:
    """Validate already-parsed YAML/JSON data; errors name each failing field."""
    try:
        return LoomConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            problems.append(f"{where}: {err['msg']}")
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
    server = server.model_copy(
        update={"host": host or server.host, "port": port or server.port, "api_keys": keys}
    )
    if not server.is_loopback and not server.keys_on:
        raise ConfigError(
            f"refusing to bind {server.host} without API keys: set server.api_keys in the "
            "config or LOOM_API_KEYS, or bind 127.0.0.1"
        )
    return config.model_copy(update={"server": server})
