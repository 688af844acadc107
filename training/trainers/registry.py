"""The trainer registry: every trainer a job may name, each registered once, as one record.

A job runs only a registered trainer, never code a client sends. Each trainer's ``Trainer``
record holds all that the job system looks up by its name:

    TRAINERS.get("lm").spec                         # LmJobSpec: what a client may ask of it
    TRAINERS.stages("lm")                           # its pipeline: split, tokenise, ...
    TRAINERS.build_program(ProgramSpec(kind="lm", params=params))  # its train stage's program
    TRAINERS.handler("lm.tokenise")                 # a queue handler of one of its stages
    TRAINERS.job_metrics("lm", outputs)             # what a finished job of it reports

Adding a trainer is one record in ``TRAINERS`` below (and the modules it names). A record
names its heavy parts (pipeline, program: torch, transformers, scikit-learn) by import path,
imported at their first use, so reading a spec in the gateway imports none of them; and since
importing this module declares every trainer, a fresh Ray worker that knows only a name (a
program's kind, a handler's) finds the code here. A test may register a trainer of its own,
with plain functions, and unregister it afterwards.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

from training.program import ProgramSpec, TrainProgram
from training.spec_fields import JobSpec
from training.stages import Stage
from training.trainers.digits_spec import DigitsJobSpec
from training.trainers.lm_spec import LmJobSpec

Handler = Callable[[dict[str, Any]], dict[str, Any]]
"""A queue handler: one work item's payload -> its result (both small JSON-able dicts)."""

ProgramBuilder = Callable[[Mapping[str, Any]], TrainProgram]
"""A ``ProgramSpec``'s plain params -> the ``TrainProgram`` they describe."""

StageOutputs = Mapping[str, Mapping[str, Any]]
"""Each finished stage's output by stage name (``training.stages.run_stages``)."""


@dataclass(frozen=True)
class Imported:
    """A function named by its import path, ``"package.module:name"`` (``name`` may be
    ``Class.method``), imported at its first call: a record names heavy code without
    importing it. Plain data: it pickles as its path."""

    path: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.load()(*args, **kwargs)

    def load(self) -> Callable[..., Any]:
        """The function itself (importing its module once; Python caches it)."""
        module_name, _, qualname = self.path.partition(":")
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
        return target


@dataclass(frozen=True, kw_only=True)
class Trainer:
    """One trainer: its name and every part the job system looks up by that name.

    Trainer(name="lm", spec=LmJobSpec, stages=Imported("training.pipelines.lm:stages"), ...)

    A part left None is one the trainer does not have: a test's trainer may bring only a
    program or only handlers, and without a ``spec`` no job can name it.
    """

    name: str
    """What a spec's ``trainer``, a ``ProgramSpec``'s ``kind`` and a handler's prefix say."""
    spec: type[JobSpec] | None = None
    """Its ``JobSpec`` subclass, whose ``trainer`` is ``Literal[name]``."""
    stages: Callable[[], Sequence[Stage[Any]]] | None = None
    """Its pipeline's stages, in order."""
    program: ProgramBuilder | None = None
    """The program its coordinated train stage runs, from a ``ProgramSpec``'s params."""
    handlers: Mapping[str, Handler] = field(default_factory=dict)
    """Its stages' queue handlers, each named ``<name>.<what>``: a work item names one of
    these, so a payload is data, never code."""
    metrics: Callable[[StageOutputs], dict[str, Any]] | None = None
    """A finished job's metrics, from its stages' outputs."""

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"a trainer's name is an identifier, not {self.name!r}")
        strays = sorted(h for h in self.handlers if not h.startswith(f"{self.name}."))
        if strays:
            raise ValueError(f"trainer {self.name}'s handlers must start {self.name}.: {strays}")
        if self.spec is not None:
            tag = get_args(self.spec.model_fields["trainer"].annotation)
            if tag != (self.name,):
                raise ValueError(
                    f"trainer {self.name}'s spec {self.spec.__name__} is tagged {tag}, "
                    f"not Literal[{self.name!r}]"
                )
        # read-only: a record is the same for every caller
        object.__setattr__(self, "handlers", types.MappingProxyType(dict(self.handlers)))


class TrainerRegistry:
    """The trainers by name, and each lookup by name, with the errors callers show users."""

    def __init__(self, trainers: Iterable[Trainer] = ()) -> None:
        self._trainers: dict[str, Trainer] = {}
        for trainer in trainers:
            self.register(trainer)

    def register(self, trainer: Trainer) -> None:
        """Add ``trainer``; ``ValueError`` if its name is taken (a test cannot replace lm)."""
        if trainer.name in self._trainers:
            raise ValueError(f"a trainer named {trainer.name!r} is already registered")
        self._trainers[trainer.name] = trainer

    def unregister(self, name: str) -> None:
        """Remove the trainer ``name`` (a test's, when it is done); nothing if absent."""
        self._trainers.pop(name, None)

    def __iter__(self) -> Iterator[Trainer]:
        return iter(list(self._trainers.values()))

    def get(self, name: str) -> Trainer:
        """The trainer ``name``; ``KeyError`` if none is registered under it."""
        return self._trainers[name]

    def job_specs(self) -> dict[str, type[JobSpec]]:
        """Name -> spec class of every trainer a job may name, in registration order."""
        return {t.name: t.spec for t in self._trainers.values() if t.spec is not None}

    def stages(self, trainer: str) -> list[Stage[Any]]:
        """The stages of ``trainer``'s pipeline; ``ValueError`` for a trainer with none."""
        found = self._trainers.get(trainer)
        if found is None or found.stages is None:
            raise ValueError(f"no pipeline for trainer {trainer!r}")
        return list(found.stages())

    def build_program(self, spec: ProgramSpec) -> TrainProgram:
        """The program ``spec`` names (by its trainer's name), built from its params."""
        found = self._trainers.get(spec.kind)
        if found is None or found.program is None:
            known = sorted(t.name for t in self._trainers.values() if t.program is not None)
            raise ValueError(f"unknown train program {spec.kind!r}; known: {known}")
        return found.program(spec.params)

    def handler(self, name: str) -> Handler:
        """The queue handler ``name`` (``<trainer>.<what>``); ``ValueError`` if none."""
        found = self._trainers.get(name.partition(".")[0])
        if found is None or name not in found.handlers:
            raise ValueError(f"no queue handler named {name!r}")
        return found.handlers[name]

    def job_metrics(self, trainer: str, outputs: StageOutputs) -> dict[str, Any]:
        """What a finished job of ``trainer`` reports, from its stages' outputs (none if the
        trainer defines no metrics)."""
        found = self.get(trainer)
        return found.metrics(outputs) if found.metrics is not None else {}


TRAINERS = TrainerRegistry(
    [
        Trainer(
            name="lm",
            spec=LmJobSpec,
            stages=Imported("training.pipelines.lm:stages"),
            program=Imported("training.trainers.lm:LmTrainProgram.from_params"),
            handlers={"lm.tokenise": Imported("training.pipelines.lm:tokenise_item")},
            metrics=Imported("training.pipelines.lm:job_metrics"),
        ),
        Trainer(
            name="digits",
            spec=DigitsJobSpec,
            stages=Imported("training.pipelines.digits:stages"),
            program=Imported("training.trainers.digits:DigitsTrainProgram.from_params"),
            handlers={"digits.member": Imported("training.pipelines.digits:train_member_item")},
            metrics=Imported("training.pipelines.digits:job_metrics"),
        ),
    ]
)
"""Every trainer Loom runs. ``lm``: a GPT-2-style language model on a text corpus;
``digits``: a sweep of small classifiers of handwritten digits."""
