"""The JobSpec: what a client may ask a training job to do, typed and checked before queueing.

Only registered trainers run, never arbitrary code. Each trainer brings its own spec class
(its hyperparameters, datasets and evaluation thresholds); ``TRAINER_SPECS`` is the registry,
and ``trainer`` is the tag that picks one:

    spec = validate_job_spec(
        load_job_spec_yaml(path.read_text()),
        capacity=ClusterCapacity(total_cpus=16, total_gpus=1),
        allowed_dataset_roots=[Path("/data")],
    )

``validate_job_spec`` is the one gate (the HTTP layer and ``loom train submit`` both call it):
a spec that passes fits the cluster and reads only allowed data. Every problem it finds comes
back together, as one ``JobSpecInvalid`` with a list of ``FieldError`` (a dotted field path
and a message), which the HTTP layer answers with 422.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, TypeAdapter, ValidationError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkerResources(_Strict):
    """What each worker of the job reserves on the cluster."""

    cpu: float = Field(1.0, gt=0, description="CPUs reserved per worker (fractions allowed).")
    gpu: float = Field(0.0, ge=0, description="GPUs reserved per worker; 0 trains on CPU.")


# --- lm: a GPT-2-style language model on a text corpus ---------------------------------------


class LmHyperparameters(_Strict):
    preset: Literal["tiny", "small", "base"] = Field(
        "tiny", description="Model size preset (layers, width, heads)."
    )
    learning_rate: float = Field(3e-4, gt=0, description="Peak AdamW learning rate.")
    batch_size: int = Field(
        16, ge=1, description="Global batch, in sequences per optimiser step, over all workers."
    )
    max_steps: int = Field(200, ge=1, description="Optimiser steps to train for.")
    seq_len: int = Field(128, ge=8, le=4096, description="Tokens per training sequence.")
    checkpoint_every_steps: int = Field(
        50, ge=1, description="Steps between checkpoints; a lost worker restarts from the last."
    )
    max_corpus_mb: float = Field(
        8.0, gt=0, le=100_000, description="Read at most this much of the corpus, in MB."
    )
    shards: int = Field(
        8, ge=1, le=4096, description="Corpus shards, tokenised in parallel through the queue."
    )
    vocab_size: int | None = Field(
        None, ge=300, le=65_536, description="Tokeniser vocabulary; None: the preset's."
    )
    seed: int = Field(0, ge=0, description="Seeds the split, the weights and the batch order.")


class LmEval(_Strict):
    max_perplexity: float | None = Field(
        None, gt=1, description="Validation perplexity above this fails the job; None: no gate."
    )


class LmJobSpecFields(_Strict):
    trainer: Literal["lm"] = Field(description="The registered trainer to run.")
    dataset: str = Field(
        "stdlib",
        min_length=1,
        description=(
            "'stdlib' (the running interpreter's standard library sources) or an absolute path "
            "to a folder of .txt/.jsonl under an allowed dataset root."
        ),
    )
    hyperparameters: LmHyperparameters = Field(
        default_factory=LmHyperparameters, description="The lm trainer's hyperparameters."
    )
    eval: LmEval = Field(default_factory=LmEval, description="Thresholds the result must meet.")


# --- digits: small classifiers on scikit-learn's bundled handwritten digits -----------------

DigitsArch = Literal["mlp", "cnn"]


class DigitsHyperparameters(_Strict):
    arch: DigitsArch | list[DigitsArch] = Field(
        "mlp", description="One architecture, or a sweep list: one member trained per entry."
    )
    learning_rate: float = Field(1e-3, gt=0, description="Adam learning rate.")
    epochs: int = Field(20, ge=1, le=1000, description="Passes over the training split.")
    batch_size: int = Field(64, ge=1, description="Samples per optimiser step.")
    hidden: int = Field(64, ge=4, le=4096, description="Width of each member's hidden layers.")
    seed: int = Field(0, ge=0, description="Seeds the train/validation split and the weights.")

    def members(self) -> list[DigitsArch]:
        """The architectures to train, one member each: ``"mlp"`` -> ``["mlp"]``."""
        return [self.arch] if isinstance(self.arch, str) else list(self.arch)


class DigitsEval(_Strict):
    min_accuracy: float | None = Field(
        None, gt=0, le=1, description="Validation accuracy (0..1) below this fails a member."
    )


class DigitsJobSpecFields(_Strict):
    trainer: Literal["digits"] = Field(description="The registered trainer to run.")
    dataset: Literal["sklearn-digits"] = Field(
        "sklearn-digits", description="scikit-learn's bundled 8x8 handwritten digits."
    )
    hyperparameters: DigitsHyperparameters = Field(
        default_factory=DigitsHyperparameters, description="The digits trainer's hyperparameters."
    )
    eval: DigitsEval = Field(
        default_factory=DigitsEval, description="Thresholds each member must meet."
    )


# --- the fields every job has ----------------------------------------------------------------


class _CommonFields(_Strict):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description=(
            "The job's label and the store name its model versions are registered under: "
            "letters, digits, '.', '_', '-', at most 64; not unique among jobs."
        ),
    )
    workers: int = Field(1, ge=1, le=256, description="Data-parallel workers for the train stage.")
    resources: WorkerResources = Field(
        default_factory=WorkerResources, description="Reserved per worker, not per job."
    )
    priority: int = Field(
        0, ge=0, le=100, description="Higher runs first; equal priorities run in submit order."
    )
    max_retries: int = Field(
        0, ge=0, le=10, description="Times a failed run is retried before the job fails."
    )
    stage_workers: int = Field(
        2, ge=1, le=256, description="Queue workers for each parallel stage (shards, members)."
    )
    on_restart: Literal["resume", "fail"] = Field(
        "resume",
        description=(
            "When a restart of the scheduler loses a running job: 'resume' queues it again to "
            "go on from its last checkpoint, 'fail' fails it with the reason."
        ),
    )
    promote: bool = Field(
        False, description="On success, move the model's 'serving' alias to the new version."
    )
    webhook_url: HttpUrl | None = Field(
        None, description="http(s) URL that receives each job event as a CloudEvent; optional."
    )


class LmJobSpec(_CommonFields, LmJobSpecFields):
    """A job for the ``lm`` trainer."""


class DigitsJobSpec(_CommonFields, DigitsJobSpecFields):
    """A job for the ``digits`` trainer."""


TRAINER_SPECS: dict[str, type[BaseModel]] = {"lm": LmJobSpec, "digits": DigitsJobSpec}
"""The trainer registry: a trainer's name -> its spec class. Adding a trainer adds a line here."""

JobSpec = Annotated[LmJobSpec | DigitsJobSpec, Field(discriminator="trainer")]
_job_spec_adapter: TypeAdapter[LmJobSpec | DigitsJobSpec] = TypeAdapter(JobSpec)


# --- validation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldError:
    field: str
    """Dotted path into the spec, e.g. ``hyperparameters.learning_rate``; "" for the whole."""
    message: str


class JobSpecInvalid(ValueError):
    """A spec was refused; ``errors`` names each field at fault (the 422 body)."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(f"{e.field or '<spec>'}: {e.message}" for e in self.errors))


@dataclass(frozen=True, kw_only=True)
class ClusterCapacity:
    """What the cluster can place at once, the bound on one job's reservation."""

    total_cpus: float
    total_gpus: float


def parse_job_spec(raw: Any) -> LmJobSpec | DigitsJobSpec:
    """The spec's shape alone (no cluster checks): for reading back a spec already admitted."""
    try:
        return _job_spec_adapter.validate_python(raw)
    except ValidationError as exc:
        raise JobSpecInvalid(_field_errors(exc)) from None


def validate_job_spec(
    raw: Any,
    *,
    capacity: ClusterCapacity,
    allowed_dataset_roots: Iterable[Path],
) -> LmJobSpec | DigitsJobSpec:
    """Check ``raw`` (a dict from JSON or YAML) as a spec for this cluster; the typed spec.

    Raises ``JobSpecInvalid`` with every field error found: shape and ranges first; if those
    pass, the reservation against ``capacity`` and the dataset against the allowed roots.
    """
    spec = parse_job_spec(raw)
    errors = [
        *placement_errors(spec.workers, spec.resources, capacity),
        *dataset_errors(spec, allowed_dataset_roots),
        *batch_errors(spec),
    ]
    if errors:
        raise JobSpecInvalid(errors)
    return spec


def placement_errors(
    workers: int, resources: WorkerResources, capacity: ClusterCapacity
) -> list[FieldError]:
    """Why ``workers`` x ``resources`` cannot fit ``capacity``; empty when it fits."""
    errors = []
    # 3 workers x 4 CPUs = 12 CPUs > 8 on the cluster -> refused
    for unit, per_worker, total in (
        ("CPUs", resources.cpu, capacity.total_cpus),
        ("GPUs", resources.gpu, capacity.total_gpus),
    ):
        needed = workers * per_worker
        if needed > total:
            errors.append(
                FieldError(
                    "workers",
                    f"{workers} workers x {per_worker:g} {unit} = {needed:g} {unit}, "
                    f"more than the cluster's {total:g}",
                )
            )
    return errors


def batch_errors(spec: LmJobSpec | DigitsJobSpec) -> list[FieldError]:
    """Why the lm trainer's global batch cannot be shared by its workers; empty when it can.

    Each of W workers takes an equal slice of every global batch (so W workers train the same
    model as one): 16 sequences over 3 workers -> refused; over 4 -> 4 each."""
    if not isinstance(spec, LmJobSpec):
        return []
    batch = spec.hyperparameters.batch_size
    if batch % spec.workers:
        return [
            FieldError(
                "hyperparameters.batch_size",
                f"the global batch of {batch} does not divide evenly among {spec.workers} workers",
            )
        ]
    return []


def dataset_errors(
    spec: LmJobSpec | DigitsJobSpec, allowed_roots: Iterable[Path]
) -> list[FieldError]:
    """Why ``spec.dataset`` may not be read; empty when it may (named datasets always may)."""
    if not isinstance(spec, LmJobSpec) or spec.dataset == "stdlib":
        return []
    path = Path(spec.dataset)
    if not path.is_absolute():
        return [FieldError("dataset", "must be 'stdlib' or an absolute path")]
    # resolve() follows symlinks and '..', so a link or '../' cannot step outside a root
    resolved = path.resolve()
    roots = [Path(root).resolve() for root in allowed_roots]
    if not any(resolved.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(root) for root in roots) or "none configured"
        return [FieldError("dataset", f"{path} is outside the allowed dataset roots ({allowed})")]
    if not resolved.is_dir():
        return [FieldError("dataset", f"{path} is not a folder")]
    return []


def _field_errors(exc: ValidationError) -> list[FieldError]:
    errors = []
    for error in exc.errors():
        loc = list(error["loc"])
        if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
            known = ", ".join(repr(name) for name in TRAINER_SPECS)
            errors.append(FieldError("trainer", f"unknown or missing trainer; known: {known}"))
            continue
        if loc and loc[0] in TRAINER_SPECS:
            loc = loc[1:]  # the union's tag, not a field of the spec
        errors.append(FieldError(".".join(str(part) for part in loc), error["msg"]))
    return errors


def load_job_spec_yaml(text: str) -> dict[str, Any]:
    """The raw spec from a YAML document (``loom train submit FILE``); not yet validated.

    ``yaml.safe_load``: plain data only, no tags that construct Python objects.
    """
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise JobSpecInvalid([FieldError("", f"not valid YAML: {exc}")]) from None
    if not isinstance(raw, dict):
        raise JobSpecInvalid([FieldError("", "a job spec is a YAML mapping of fields")])
    return raw
