"""The coordinated batch (Burns ch. 13): one model trained data-parallel by W workers.

W processes join at a barrier, each computes the gradient of its equal slice of every global
batch, the gradients are all-reduced (averaged) so every rank takes the same optimiser step,
rank 0 checkpoints, and at the end the ranks' training losses are reduced to one figure (join,
then reduce). A lost worker costs the whole group: the driver kills it and starts a fresh one,
which resumes from the last checkpoint.

    result = run_coordinated(
        ProgramSpec(kind="digits", params={"batch_size": 32, "max_steps": 200}),
        world_size=2, checkpoint_dir=str(ws.checkpoint_dir), checkpoint_every_steps=50,
    )
    result.metrics["val_accuracy"], result.restarts, result.final_weights

Why plain Ray actors running ``torch.distributed`` (gloo on CPU, NCCL when a GPU is reserved)
and not Ray Train's ``TorchTrainer``: what Ray Train adds (run storage, checkpoint tracking,
retries, a controller) Loom already owns in the job store, ``training.checkpoint`` and the work
queue, and two owners of one job's state would disagree after a crash. Plain actors also go
straight into the job's placement group, and every step (rendezvous, barrier, all-reduce,
restart) stays visible in this one file.

Two layers: ``run_rank`` is one rank's whole life in one process (no Ray; a unit test runs it
with W=1), ``run_coordinated`` is the driver that places W ``TrainWorker`` actors, waits, and
restarts or gives up. Checkpoints are read by every rank at start, so in a cluster
``checkpoint_dir`` must be on storage all nodes share (the job workspace volume).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from training.checkpoint import (
    FINAL_WEIGHTS_FILE,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_final_weights,
)
from training.holds import StepHolds
from training.program import GRAD_CLIP_NORM, ProgramSpec, TrainingStopped
from training.trainers.registry import TRAINERS

if TYPE_CHECKING:  # Ray itself is imported where it is used: run_rank runs without it
    from ray import ObjectRef
    from ray.actor import ActorHandle
    from ray.util.placement_group import PlacementGroup

LOSS_WINDOW_STEPS = 10
"""The reported training loss is the mean over this many last steps (one step is noisy)."""

ProgressFn = Callable[[int, int, float], None]
"""``progress(steps_done, max_steps, loss)``; runs in rank 0's process, so it must pickle."""


class CoordinatedTrainingFailed(RuntimeError):
    """The group could not finish: a program error (not retried) or too many lost workers."""

    def __init__(self, reason: str, *, restarts: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.restarts = restarts
        """Groups restarted before giving up."""


@dataclass(frozen=True)
class CoordinatedResult:
    metrics: dict[str, float]
    """Rank 0's: ``train_loss`` (reduced over ranks), the program's eval metrics, ``steps``,
    ``resumed_from_step`` (of the group that finished; 0 if it started fresh)."""
    restarts: int
    """Groups started again after a lost worker (0 when the first group finished)."""
    final_weights: Path
    """``final.safetensors`` in the checkpoint folder: the plain module's state dict."""


# --- one rank ----------------------------------------------------------------------------------


def _to_device(batch: Any, device: str) -> Any:
    """``batch`` with every tensor in it on ``device`` (tensors, dataclasses, dicts, tuples)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {
            f.name: _to_device(getattr(batch, f.name), device) for f in dataclasses.fields(batch)
        }
        return dataclasses.replace(batch, **changes)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


def _mean_over_ranks(values: Sequence[float], *, world_size: int, device: str) -> list[float]:
    """Each position's mean over the ranks (a collective: every rank must call it alike).

    Ranks' slices are equal in size, so the mean of their mean losses is the global batch's
    mean loss: rank 0 saw 0.40 and rank 1 0.60 on step 7 -> 0.50. Values that are already the
    same on every rank (a window restored from a checkpoint) come back unchanged."""
    if world_size == 1 or not values:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return (tensor / world_size).tolist()


def run_rank(
    program_spec: ProgramSpec,
    *,
    rank: int,
    world_size: int,
    init_method: str,
    checkpoint_dir: str,
    checkpoint_every_steps: int,
    progress: ProgressFn | None = None,
    hold: StepHolds | None = None,
    device: str = "cpu",
    timeout_s: float = 120.0,
) -> dict[str, float]:
    """Train as rank ``rank`` of ``world_size`` until the program's ``max_steps``; its metrics.

    Joins the group at ``init_method`` (``tcp://host:port``, rank 0 listening), waits at the
    barrier, resumes from the newest complete checkpoint in ``checkpoint_dir`` if there is one,
    and steps: every rank's gradient is all-reduced (DDP, when W > 1), clipped to
    ``GRAD_CLIP_NORM`` and applied. Rank 0 saves a checkpoint every ``checkpoint_every_steps``
    and after the last step, calls ``progress`` after each step with its own slice's loss, and
    at the end evaluates and writes ``final.safetensors``. With ``hold`` (tests' fault
    injection, ``training.holds``) rank 0 stops after a requested step, once its checkpoint
    and progress report are done. Returns ``train_loss`` (mean of the last
    ``LOSS_WINDOW_STEPS`` steps' global losses), ``steps``, ``resumed_from_step``, plus the
    eval metrics on rank 0. ``timeout_s`` bounds each collective wait for a silent peer.
    """
    if checkpoint_every_steps < 1:
        raise ValueError(f"checkpoint_every_steps must be >= 1, not {checkpoint_every_steps}")
    ckpt_dir = Path(checkpoint_dir)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        dist.barrier()  # the coordinated batch's barrier: no rank starts before all have joined
        program = TRAINERS.build_program(program_spec)
        model = program.build_model().to(device)  # seeded: the same weights on every rank
        optimizer = program.build_optimizer(model)
        start_step = 0
        recent: deque[float] = deque(maxlen=LOSS_WINDOW_STEPS)
        found = latest_checkpoint(ckpt_dir)
        if found is not None:
            # every rank loads (the optimiser state is not broadcast); before DDP is built, so
            # rank 0 cannot prune this folder yet: its next save needs collectives with us
            state = load_checkpoint(found, model=model, optimizer=optimizer, device=device)
            start_step = state.step
            recent.extend(state.extra.get("recent_losses", []))
        trained: torch.nn.Module = model
        if world_size > 1:
            device_ids = [torch.device(device).index or 0] if backend == "nccl" else None
            trained = DistributedDataParallel(model, device_ids=device_ids)

        model.train()
        loop_started = time.perf_counter()
        for step in range(start_step, program.max_steps):
            rate = program.learning_rate(step)
            for group in optimizer.param_groups:
                group["lr"] = rate
            batch = _to_device(program.batch(step, rank=rank, world_size=world_size), device)
            loss = program.loss(trained, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP: the gradients arrive here averaged over the W ranks
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
            optimizer.step()
            loss_value = loss.item()
            recent.append(loss_value)
            done = step + 1
            if done % checkpoint_every_steps == 0 or done == program.max_steps:
                # a collective on every rank alike; the saved window is then the global one
                recent = deque(
                    _mean_over_ranks(recent, world_size=world_size, device=device),
                    maxlen=LOSS_WINDOW_STEPS,
                )
                if rank == 0:
                    save_checkpoint(
                        ckpt_dir,
                        step=done,
                        model=model,
                        optimizer=optimizer,
                        extra={"recent_losses": list(recent)},
                    )
            if rank == 0 and progress is not None:
                progress(done, program.max_steps, loss_value)
            if rank == 0 and hold is not None:
                hold.hold_after(done)  # the other ranks wait at their next collective

        loop_s = time.perf_counter() - loop_started
        # the reduce: one training loss for the run, the same on every rank
        window = _mean_over_ranks(recent, world_size=world_size, device=device)
        metrics: dict[str, float] = {
            "train_loss": sum(window) / len(window) if window else math.nan,
            "steps": float(program.max_steps),
            "resumed_from_step": float(start_step),
            # the steps alone (checkpoints and progress reports included), without joining,
            # loading or the final evaluation: the steady-state rate is steps x batch / this
            "loop_seconds": loop_s,
        }
        if rank == 0:
            metrics.update(program.evaluate(model))  # the plain module: no collectives inside
            save_final_weights(ckpt_dir, model)
        return metrics
    finally:
        dist.destroy_process_group()


def free_local_port() -> int:
    """A TCP port free on this host now (bound to 0 and released; the usual small race)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class TrainWorker:
    """One rank's process: a plain class, made a Ray actor at the call site.

    Worker = ray.remote(TrainWorker).options(num_cpus=1)
    worker = Worker.remote()
    ray.get(worker.run.remote(spec, rank=0, world_size=1, init_method=..., ...))
    """

    def run(self, program_spec: ProgramSpec, **kwargs: Any) -> dict[str, float]:
        """``run_rank`` in this process; keyword arguments as ``run_rank`` takes them."""
        return run_rank(program_spec, **kwargs)

    def node_ip(self) -> str:
        """The address other nodes reach this one at (rank 0's is the rendezvous host)."""
        import ray

        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        return free_local_port()

    def pid(self) -> int:
        """This worker's process id (tests check that no process outlives the group)."""
        return os.getpid()


# --- the driver ----------------------------------------------------------------------------------

FAILURE_GRACE_S = 5.0
"""After the first rank fails, how long the driver waits for the others to report before it
judges the failure: the first error seen is often a survivor's broken all-reduce, and the
cause (a dead process) arrives just after it."""


class _GroupLost(Exception):
    """A worker process was lost (or a collective broke): worth a fresh group."""


def _failure_of(ref: ObjectRef[dict[str, float]]) -> tuple[str, BaseException] | None:
    """None if ``ref`` (ready) succeeded; else ``("lost" | "program", error)``.

    ``lost``: the process died (``RayActorError`` and Ray's other system errors) or a
    collective broke because a peer did (``torch.distributed.DistError``). ``program``: user
    code raised (``ValueError`` from ``batch``, say), which a fresh group would only repeat.
    """
    import ray
    from ray.exceptions import RayActorError, RayError, RayTaskError

    try:
        ray.get(ref)
    except RayActorError as error:
        return "lost", error
    except RayTaskError as error:
        cause = getattr(error, "cause", None)
        return ("lost" if isinstance(cause, dist.DistError) else "program"), error
    except RayError as error:
        return "lost", error
    return None


def _first_line(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"


def _start_group(
    world_size: int, *, num_cpus: float, num_gpus: float, placement_group: PlacementGroup | None
) -> list[ActorHandle[TrainWorker]]:
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    worker_class = ray.remote(TrainWorker)
    actors: list[Any] = []  # Ray's stubs type a new actor as its handle or its class
    for rank in range(world_size):
        options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_restarts": 0}
        if placement_group is not None:
            # one bundle per rank: bundle i holds rank i's reservation
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=placement_group, placement_group_bundle_index=rank
            )
        actors.append(worker_class.options(**options).remote())
    return actors


def _kill_all(actors: Sequence[ActorHandle[TrainWorker]]) -> None:
    import ray

    for actor in actors:
        with contextlib.suppress(Exception):  # already dead is what we want
            ray.kill(actor, no_restart=True)


def _run_group(
    actors: Sequence[Any],  # ActorHandle[TrainWorker]: Ray's stubs do not type ``.remote``
    program_spec: ProgramSpec,
    *,
    run_kwargs: Mapping[str, Any],
    progress: ProgressFn | None,
    hold: StepHolds | None,
    should_stop: Callable[[], bool],
    poll_interval_s: float,
) -> dict[str, float]:
    """Run one group to the end; rank 0's metrics. Raises ``_GroupLost``, ``TrainingStopped``
    or ``CoordinatedTrainingFailed`` (a program error; ``restarts`` filled in by the caller)."""
    import ray
    from ray.exceptions import RayActorError

    try:
        # the rendezvous: rank 0's node and a port free there; rank 0 listens, the rest dial
        host = ray.get(actors[0].node_ip.remote())
        port = ray.get(actors[0].free_port.remote())
    except RayActorError as exc:
        raise _GroupLost(f"rank 0 was lost before the rendezvous: {_first_line(exc)}") from None
    world_size = len(actors)
    refs = [
        actor.run.remote(
            program_spec,
            rank=rank,
            world_size=world_size,
            init_method=f"tcp://{host}:{port}",
            progress=progress if rank == 0 else None,
            hold=hold if rank == 0 else None,
            **run_kwargs,
        )
        for rank, actor in enumerate(actors)
    ]
    rank_of = {ref: rank for rank, ref in enumerate(refs)}
    pending = list(refs)
    while pending:
        if should_stop():
            raise TrainingStopped("coordinated training stopped on request")
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=poll_interval_s)
        failures = [(rank_of[ref], f) for ref in ready if (f := _failure_of(ref)) is not None]
        if not failures:
            continue
        late, _ = ray.wait(pending, num_returns=len(pending), timeout=FAILURE_GRACE_S)
        failures += [(rank_of[ref], f) for ref in late if (f := _failure_of(ref)) is not None]
        lost = [(rank, error) for rank, (kind, error) in failures if kind == "lost"]
        program = [(rank, error) for rank, (kind, error) in failures if kind == "program"]
        if program and not any(isinstance(error, RayActorError) for _, error in lost):
            rank, error = program[0]
            # not retried: the same program on a fresh group fails the same way
            raise CoordinatedTrainingFailed(
                f"rank {rank} failed in the program: {_first_line(error)}", restarts=0
            ) from error
        # name the dead process, not a survivor whose all-reduce broke because of it
        lost.sort(key=lambda item: not isinstance(item[1], RayActorError))
        rank, error = lost[0]
        raise _GroupLost(f"rank {rank} lost: {_first_line(error)}")
    return ray.get(refs[0])


def run_coordinated(
    program_spec: ProgramSpec,
    *,
    world_size: int,
    checkpoint_dir: str,
    checkpoint_every_steps: int,
    num_cpus: float = 1,
    num_gpus: float = 0,
    placement_group: PlacementGroup | None = None,
    progress: ProgressFn | None = None,
    hold: StepHolds | None = None,
    log: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    max_restarts: int = 3,
    poll_interval_s: float = 0.5,
    on_group_started: Callable[[list[ActorHandle[TrainWorker]]], None] | None = None,
) -> CoordinatedResult:
    """Train ``program_spec`` on ``world_size`` Ray actors to the end; the reduced result.

    Each rank is a ``TrainWorker`` actor reserving ``num_cpus``/``num_gpus`` (a GPU rank trains
    on its own GPU with NCCL; give each rank a whole one), in bundle ``rank`` of
    ``placement_group`` when one is given (it needs >= ``world_size`` bundles that fit). The
    driver polls ``should_stop`` every ``poll_interval_s``: True kills the group and raises
    ``TrainingStopped``. A lost worker kills the group and starts a fresh one that resumes from
    the last checkpoint, at most ``max_restarts`` times, then ``CoordinatedTrainingFailed``;
    an error raised by the program's own code fails at once. ``log(message)`` hears why each
    restart happened; ``on_group_started(actors)`` sees each group's actors, rank order;
    ``hold`` goes to rank 0 (``run_rank``). The actors are killed however this returns.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, not {world_size}")
    if placement_group is not None and len(placement_group.bundle_specs) < world_size:
        raise ValueError(
            f"placement group has {len(placement_group.bundle_specs)} bundles, "
            f"{world_size} ranks need one each"
        )
    say = log or (lambda message: None)
    run_kwargs = {
        "checkpoint_dir": str(checkpoint_dir),
        "checkpoint_every_steps": checkpoint_every_steps,
        "device": "cuda" if num_gpus > 0 else "cpu",
    }
    restarts = 0
    while True:
        if should_stop():
            raise TrainingStopped("coordinated training stopped on request")
        actors = _start_group(
            world_size, num_cpus=num_cpus, num_gpus=num_gpus, placement_group=placement_group
        )
        try:
            if on_group_started is not None:
                on_group_started(list(actors))
            metrics = _run_group(
                actors,
                program_spec,
                run_kwargs=run_kwargs,
                progress=progress,
                hold=hold,
                should_stop=should_stop,
                poll_interval_s=poll_interval_s,
            )
        except _GroupLost as lost:
            if restarts >= max_restarts:
                raise CoordinatedTrainingFailed(
                    f"gave up after {restarts} restarts: {lost}", restarts=restarts
                ) from None
            restarts += 1
            resume = latest_checkpoint(Path(checkpoint_dir))
            say(
                f"{lost}; restarting the group of {world_size} "
                f"({restarts}/{max_restarts}) from {resume.name if resume else 'the start'}"
            )
            continue
        except CoordinatedTrainingFailed as failed:
            raise CoordinatedTrainingFailed(failed.reason, restarts=restarts) from failed.__cause__
        finally:
            _kill_all(actors)
        return CoordinatedResult(
            metrics=metrics,
            restarts=restarts,
            final_weights=Path(checkpoint_dir) / FINAL_WEIGHTS_FILE,
        )
