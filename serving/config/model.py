"""A model entry of the config: a plain model, a pool or an ensemble, each its own type.

Which one an entry is follows from its keys: ``ensemble:`` makes an ensemble, ``multiplex:``
a pool, anything else a plain model with a ``source``. Each type has only the fields that
mean something for it, so an ensemble with replicas or a pool with a source cannot be built;
what a user gets wrong is still said in words that name the field.

    entry = parse_entry({"name": "minilm", "source": "minilm"})      # ModelConfig
    entry = parse_entry({"name": "digits", "task": "classify",
                         "multiplex": {"models": ["digits-a@1"]}})   # PoolConfig
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    field_validator,
    model_validator,
)

from models.errors import InvalidModelRef
from models.refs import validate_name
from serving.config.ensemble import COMBINE_TASK, EnsembleConfig
from serving.config.faults import FaultsConfig
from serving.config.pool import MultiplexConfig, parse_ref
from serving.config.sections import (
    AutoscalingConfig,
    BatchingConfig,
    GenerationSettings,
    LimitsConfig,
)
from serving.config.sharding import ShardingConfig

Task = Literal["embed", "generate", "classify"]
RowTask = Literal["classify", "embed"]
"""Tasks whose replicas batch rows: what a pool or an ensemble may serve."""

FAULTS_APPLY = (
    "faults apply to an embed or classify model's own replicas, not a pool, an ensemble or a "
    "generate model"
)


def _refuse_keys(data: Any, keys: tuple[str, ...], message: str) -> None:
    """``ValueError(message)`` when ``data`` (an entry's raw mapping) sets any of ``keys``."""
    if isinstance(data, dict) and any(data.get(k) is not None for k in keys):
        raise ValueError(message)


class _Entry(BaseModel):
    """What every entry has: the name clients call, the task, the per-request limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="The name clients call the model by (a pool's: not callable).")
    task: Task = Field("embed", description="What the model does.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)

    @field_validator("name")
    @classmethod
    def _name_is_well_formed(cls, value: str) -> str:
        parse_ref(value)  # same alphabet as the store: no slashes, no traversal
        if "@" in value or "#" in value:
            raise ValueError("a served name may not contain '@' or '#'")
        return value


class _Deployed(_Entry):
    """An entry with replicas of its own: where they run and how they batch."""

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
    sharding: ShardingConfig | None = Field(
        None,
        description="Serve this entry as shards, each its own replicated deployment, placed by "
        "a consistent-hash ring over the model name (pools) or the X-Loom-Shard-Key header.",
    )

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> _Deployed:
        if self.autoscaling is not None and self.replicas not in (None, 1):
            raise ValueError("give either replicas or autoscaling, not both")
        return self

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, round(self.num_cpus))

    @property
    def max_replicas(self) -> int:
        """The most replicas this entry runs (per version, per shard)."""
        return self.autoscaling.max_replicas if self.autoscaling else (self.replicas or 1)


class ModelConfig(_Deployed):
    """A plain model: one store source, served by its own replicas."""

    source: str = Field(description="Store reference: NAME, NAME@VERSION or NAME#ALIAS.")
    generation: GenerationSettings = Field(
        default_factory=GenerationSettings, description="Only for task generate."
    )
    traffic: dict[str, float] | None = Field(
        None,
        description='Canary split between pinned versions by weight, e.g. {"3": 90, "4": 10}; '
        "source then names the store model alone (NAME). Each version must exist at start.",
    )
    faults: FaultsConfig | None = Field(
        None,
        description="Inject delays or errors into this model's replicas, per call (testing, "
        "incident drills, tail-latency benchmarks); none by default.",
    )

    @model_validator(mode="before")
    @classmethod
    def _has_a_source(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (k in _KIND_KEYS and v is None)}
            if data.get("source") is None:
                raise ValueError("source is required (a store reference)")
        return data

    @field_validator("source")
    @classmethod
    def _source_is_a_store_ref(cls, value: str) -> str:
        parse_ref(value)
        return value

    @field_validator("traffic")
    @classmethod
    def _traffic_is_weighted_versions(
        cls, value: dict[str, float] | None
    ) -> dict[str, float] | None:
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
    def _fits_together(self) -> ModelConfig:
        if self.faults is not None and self.task == "generate":
            raise ValueError(FAULTS_APPLY)
        if self.sharding is not None:
            if self.traffic is not None:
                raise ValueError("sharding and a traffic split cannot be combined")
            if self.sharding.key == "model":
                raise ValueError(
                    "sharding.key model places each called model on a shard, so it needs a "
                    "pool (multiplex) of many; one model would all go to one shard: use key "
                    "header"
                )
        ref = parse_ref(self.source)
        if self.traffic is not None and (ref.version is not None or ref.alias is not None):
            raise ValueError(
                "with traffic, source names the store model alone (NAME), not a version or alias"
            )
        return self


class PoolConfig(_Deployed):
    """A multiplexed pool: one deployment whose replicas load its members on demand; clients
    call the members, never the pool."""

    task: RowTask = Field("embed", description="What the members do: classify or embed.")
    multiplex: MultiplexConfig = Field(
        description="The members and how many one replica holds loaded."
    )

    @model_validator(mode="before")
    @classmethod
    def _a_pool_takes_no_source(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("task", "embed") not in get_args(RowTask):
            raise ValueError(
                f"a pool (multiplex) serves task classify or embed, not {data.get('task')}"
            )
        _refuse_keys(data, ("faults",), FAULTS_APPLY)
        _refuse_keys(
            data,
            ("source", "traffic"),
            "a pool (multiplex) names its members there, not source or traffic",
        )
        return data

    @property
    def members(self) -> dict[str, str]:
        """Member name -> its pinned ref."""
        return self.multiplex.members

    def member(self, name: str) -> ModelConfig:
        """Member ``name`` as a plain model: the pool's settings, its pinned ref, no sharding
        of its own (the pool's entry is what is sharded)."""
        fields = self.model_dump(exclude={"multiplex", "sharding"})
        return ModelConfig.model_validate({**fields, "name": name, "source": self.members[name]})


class EnsembleEntry(_Entry):
    """A scatter/gather ensemble over other served models: no source, no replicas of its own."""

    task: RowTask = Field("embed", description="classify (probabilities) or embed (vectors).")
    ensemble: EnsembleConfig = Field(description="Members, combine, deadline, quorum, hedging.")

    @model_validator(mode="before")
    @classmethod
    def _an_ensemble_deploys_nothing(cls, data: Any) -> Any:
        _refuse_keys(
            data,
            ("source", "traffic", "multiplex"),
            "an ensemble names its members there, not source, traffic or multiplex",
        )
        _refuse_keys(data, ("faults",), FAULTS_APPLY)
        _refuse_keys(
            data, ("sharding",), "an ensemble has no deployment to shard; shard its members"
        )
        return data

    @model_validator(mode="after")
    def _task_is_the_combines(self) -> EnsembleEntry:
        task = COMBINE_TASK[self.ensemble.combine]
        if self.task != task:
            raise ValueError(
                f"combine {self.ensemble.combine} serves task {task}; this ensemble is {self.task}"
            )
        return self


_KIND_KEYS = ("multiplex", "ensemble")
ENTRY_TAGS = ("model", "pool", "ensemble")
"""The union's tags: pydantic puts the tag in an error's location (dropped when reported)."""


def entry_kind(value: Any) -> str:
    """Which entry type a raw mapping (or a built entry) is."""
    if isinstance(value, BaseModel):
        kinds = {ModelConfig: "model", PoolConfig: "pool", EnsembleEntry: "ensemble"}
        return kinds.get(type(value), "model")
    if isinstance(value, dict):
        if value.get("ensemble") is not None:
            return "ensemble"
        if value.get("multiplex") is not None:
            return "pool"
    return "model"


ModelEntry = Annotated[
    Annotated[ModelConfig, Tag("model")]
    | Annotated[PoolConfig, Tag("pool")]
    | Annotated[EnsembleEntry, Tag("ensemble")],
    Discriminator(entry_kind),
]
"""Any model entry."""
DeployedEntry = ModelConfig | PoolConfig
"""An entry with replicas of its own (version apps the reconciler deploys)."""
ServedEntry = ModelConfig | EnsembleEntry
"""What a callable name is served by (a pool member: its own ``ModelConfig``)."""

_ENTRY: TypeAdapter[ModelConfig | PoolConfig | EnsembleEntry] = TypeAdapter(ModelEntry)


def parse_entry(data: object) -> ModelConfig | PoolConfig | EnsembleEntry:
    """One entry from its dump (a replica rebuilds its config this way)."""
    return _ENTRY.validate_python(data)
