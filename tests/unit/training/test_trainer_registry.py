"""The trainer registry: one record per trainer, and every lookup by name goes through it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import pytest
from pydantic import Field

from training.program import ProgramSpec
from training.spec import JobSpecInvalid, parse_job_spec
from training.spec_fields import JobSpec
from training.stages import Stage
from training.trainers.lm_spec import LmJobSpec
from training.trainers.registry import TRAINERS, Imported, Trainer


class EchoJobSpec(JobSpec):
    trainer: Literal["echo"] = Field(description="The registered trainer to run.")


class EchoProgram:
    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = dict(params)


def shout(payload: dict[str, Any]) -> dict[str, Any]:
    return {"said": str(payload["text"]).upper()}


@pytest.fixture
def echo() -> Iterator[Trainer]:
    """A trainer of the test's own: spec, stages, program, one handler, metrics."""
    trainer = Trainer(
        name="echo",
        spec=EchoJobSpec,
        stages=lambda: [Stage("say", "sink", 1.0, lambda context: {"said": "hi"})],
        program=EchoProgram,  # type: ignore[arg-type]  # a stand-in: never trained
        handlers={"echo.shout": shout},
        metrics=lambda outputs: {"said": outputs["say"]["said"]},
    )
    TRAINERS.register(trainer)
    yield trainer
    TRAINERS.unregister("echo")


def test_every_part_a_builtin_record_names_imports() -> None:
    # a typo in an import path would otherwise surface only inside a running job
    parts = 0
    for trainer in TRAINERS:
        named = [trainer.stages, trainer.program, trainer.metrics, *trainer.handlers.values()]
        for part in named:
            assert isinstance(part, Imported), (trainer.name, part)
            assert callable(part.load()), part.path
            parts += 1
    assert parts == 2 * 4  # lm and digits: stages, program, metrics, one handler each


def test_a_tests_own_trainer_is_found_by_every_lookup_then_gone(echo: Trainer) -> None:
    spec = parse_job_spec({"name": "e", "trainer": "echo"})
    assert isinstance(spec, EchoJobSpec)
    assert [s.name for s in TRAINERS.stages("echo")] == ["say"]
    program = TRAINERS.build_program(ProgramSpec(kind="echo", params={"n": 1}))
    assert isinstance(program, EchoProgram)
    assert program.params == {"n": 1}
    assert TRAINERS.handler("echo.shout")({"text": "hi"}) == {"said": "HI"}
    assert TRAINERS.job_metrics("echo", {"say": {"said": "hi"}}) == {"said": "hi"}
    TRAINERS.unregister("echo")
    with pytest.raises(JobSpecInvalid, match="known: 'lm', 'digits'$"):
        parse_job_spec({"name": "e", "trainer": "echo"})
    with pytest.raises(ValueError, match="no queue handler named 'echo.shout'"):
        TRAINERS.handler("echo.shout")


def test_a_trainer_without_a_spec_cannot_be_named_by_a_job() -> None:
    TRAINERS.register(Trainer(name="helper", handlers={"helper.shout": shout}))
    try:
        with pytest.raises(JobSpecInvalid, match="trainer: unknown or missing trainer"):
            parse_job_spec({"name": "h", "trainer": "helper"})
        assert TRAINERS.handler("helper.shout")({"text": "a"}) == {"said": "A"}
    finally:
        TRAINERS.unregister("helper")


def test_unknown_names_get_the_errors_users_see() -> None:
    with pytest.raises(
        ValueError, match=r"unknown train program 'nope'; known: \['digits', 'lm'\]"
    ):
        TRAINERS.build_program(ProgramSpec(kind="nope"))
    with pytest.raises(ValueError, match="no queue handler named 'lm.nope'"):
        TRAINERS.handler("lm.nope")
    with pytest.raises(ValueError, match="no pipeline for trainer 'x'"):
        TRAINERS.stages("x")


def test_a_record_that_disagrees_with_itself_or_takes_a_name_is_refused() -> None:
    with pytest.raises(ValueError, match="handlers must start lm2.: \\['lm.tokenise'\\]"):
        Trainer(name="lm2", handlers={"lm.tokenise": shout})
    with pytest.raises(ValueError, match="spec LmJobSpec is tagged \\('lm',\\)"):
        Trainer(name="lm2", spec=LmJobSpec)
    with pytest.raises(ValueError, match="a trainer named 'lm' is already registered"):
        TRAINERS.register(Trainer(name="lm"))
    assert TRAINERS.get("lm").spec is LmJobSpec  # still the real one


def _fresh_python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_reading_a_spec_imports_no_torch_ray_or_sklearn() -> None:
    # what the gateway does with a submitted job, in a process that has imported nothing else
    loaded = _fresh_python(
        "import sys\n"
        "from training.spec import parse_job_spec\n"
        "parse_job_spec({'name': 'x', 'trainer': 'lm'})\n"
        "parse_job_spec({'name': 'y', 'trainer': 'digits'})\n"
        "print(sorted(m for m in ('torch', 'ray', 'sklearn', 'transformers') if m in sys.modules))"
    )
    assert loaded == "[]"


def test_a_fresh_process_finds_a_handler_and_a_program_by_name_alone() -> None:
    # a new Ray worker knows only the names a work item or a ProgramSpec carries
    found = _fresh_python(
        "from training.trainers.registry import TRAINERS\n"
        "handler = TRAINERS.handler('digits.member').load()\n"
        "program = TRAINERS.get('lm').program.load()\n"
        "print(handler.__module__, handler.__name__, program.__qualname__)"
    )
    assert found == "training.pipelines.digits train_member_item LmTrainProgram.from_params"
