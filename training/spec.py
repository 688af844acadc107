"""The JobSpec: what a client may ask a training job to do, typed and checked before queueing.

Only registered trainers run, never arbitrary code. Each trainer brings its own spec class
(its hyperparameters, datasets and evaluation thresholds), named by its record in the trainer
registry (``training.trainers.registry``), and ``trainer`` is the tag that picks one:

    spec = validate_job_spec(
        load_job_spec_yaml(path.read_text()),
        capacity=ClusterCapacity(total_cpus=16, total_gpus=1),
        allowed_dataset_roots=[Path("/data")],
    )

``validate_job_spec`` is the one gate (the HTTP layer and ``loom train submit`` both call it):
a spec that passes fits the cluster and reads only allowed data. Every problem it finds comes
back together, as one ``JobSpecInvalid`` with a list of ``FieldError`` (a dotted field path
and a message), which the HTTP layer answers with 422.

The spec classes live with their trainers (``training/trainers/<name>_spec.py``) and the
fields all share in ``training.spec_fields``; they are named here too, as the spec's one
public face. Nothing here imports torch: the gateway reads specs with this module.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import Field, TypeAdapter, ValidationError

from training.datasets import TEXT_SUFFIXES, dataset_files, first_escaping_file
from training.spec_fields import JobSpec, WorkerResources
from training.trainers.digits_spec import (
    DigitsArch,
    DigitsEval,
    DigitsHyperparameters,
    DigitsJobSpec,
)
from training.trainers.lm_spec import LmEval, LmHyperparameters, LmJobSpec
from training.trainers.registry import TRAINERS

__all__ = [
    "ClusterCapacity",
    "DigitsArch",
    "DigitsEval",
    "DigitsHyperparameters",
    "DigitsJobSpec",
    "FieldError",
    "JobSpec",
    "JobSpecInvalid",
    "LmEval",
    "LmHyperparameters",
    "LmJobSpec",
    "WorkerResources",
    "batch_errors",
    "dataset_errors",
    "load_job_spec_yaml",
    "parse_job_spec",
    "placement_errors",
    "validate_job_spec",
]


@functools.lru_cache(maxsize=8)
def _spec_adapter(specs: tuple[type[JobSpec], ...]) -> TypeAdapter[JobSpec]:
    """One validator for ``specs``, picked between by ``trainer`` (cached per set of specs:
    a test that registers a trainer gets a fresh one)."""
    tagged: Any = Union[specs]  # noqa: UP007 - a union of a runtime tuple has no | form
    return TypeAdapter(Annotated[tagged, Field(discriminator="trainer")])


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
    """What training may place at once, the bound on one job's reservation: the CPUs and GPUs
    set aside for training (``training.cpus`` / ``training.gpus``), never more than the
    cluster holds, whose total includes what the serving replicas reserve."""

    total_cpus: float
    total_gpus: float


def parse_job_spec(raw: Any) -> JobSpec:
    """The spec's shape alone (no cluster checks): for reading back a spec already admitted.

    The result is the class of the registered trainer ``raw["trainer"]`` names
    (``LmJobSpec``, ``DigitsJobSpec``, ...)."""
    specs = TRAINERS.job_specs()
    try:
        return _spec_adapter(tuple(specs.values())).validate_python(raw)
    except ValidationError as exc:
        raise JobSpecInvalid(_field_errors(exc, trainers=list(specs))) from None


def validate_job_spec(
    raw: Any,
    *,
    capacity: ClusterCapacity,
    allowed_dataset_roots: Iterable[Path],
) -> JobSpec:
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
    """Why ``workers`` x ``resources`` cannot fit ``capacity``; empty when it fits. Each error
    names the resource field (``resources.cpu``, ``resources.gpu``): a job that asks for
    more than training has could never be placed, and would hold the head of the queue."""
    errors = []
    # 3 workers x 4 CPUs = 12 CPUs > 8 set aside for training -> refused on resources.cpu
    for field, unit, per_worker, total, setting in (
        ("resources.cpu", "CPUs", resources.cpu, capacity.total_cpus, "training.cpus"),
        ("resources.gpu", "GPUs", resources.gpu, capacity.total_gpus, "training.gpus"),
    ):
        needed = workers * per_worker
        if needed > total:
            errors.append(
                FieldError(
                    field,
                    f"{workers} workers x {per_worker:g} {unit} = {needed:g} {unit}, "
                    f"more than the {total:g} set aside for training ({setting})",
                )
            )
    return errors


def batch_errors(spec: JobSpec) -> list[FieldError]:
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


def dataset_errors(spec: JobSpec, allowed_roots: Iterable[Path]) -> list[FieldError]:
    """Why ``spec.dataset`` may not be read; empty when it may (named datasets always may)."""
    if not isinstance(spec, LmJobSpec) or spec.dataset == "stdlib":
        return []
    if "\x00" in spec.dataset:  # no path holds one; pathlib raises ValueError on it
        return [FieldError("dataset", "must not contain a NUL character")]
    path = Path(spec.dataset)
    if not path.is_absolute():
        return [FieldError("dataset", "must be 'stdlib' or an absolute path")]
    try:
        # resolve() follows symlinks and '..', so a link or '../' cannot step outside a root
        resolved = path.resolve()
        roots = [Path(root).resolve() for root in allowed_roots]
        if not any(resolved.is_relative_to(root) for root in roots):
            allowed = ", ".join(str(root) for root in roots) or "none configured"
            message = f"{path} is outside the allowed dataset roots ({allowed})"
            return [FieldError("dataset", message)]
        if not resolved.is_dir():
            return [FieldError("dataset", f"{path} is not a folder")]
        # and each file on its own: a link inside the folder must not lead out of it
        escaped = first_escaping_file(dataset_files(resolved, suffixes=TEXT_SUFFIXES), resolved)
        if escaped is not None:
            link, target = escaped
            message = f"{link} leads to {target}, outside the dataset folder {resolved}"
            return [FieldError("dataset", message)]
    except OSError as exc:  # a name too long, a loop of links, no permission, ...
        return [FieldError("dataset", f"{path} cannot be read: {exc.strerror or exc}")]
    return []


def _field_errors(exc: ValidationError, *, trainers: Sequence[str]) -> list[FieldError]:
    """Pydantic's errors as ``FieldError``s; ``trainers``: the names a job may give."""
    errors = []
    for error in exc.errors():
        loc = list(error["loc"])
        if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
            known = ", ".join(repr(name) for name in trainers)
            errors.append(FieldError("trainer", f"unknown or missing trainer; known: {known}"))
            continue
        if loc and loc[0] in trainers:
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
