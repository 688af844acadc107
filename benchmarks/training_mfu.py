"""The ``lm`` trainer's model trained by a bare loop on one device: tokens/s and model-FLOPs
utilisation (MFU). Ray-free and job-free, so a GPU node with only torch and transformers runs
it (``benchmarks.gpu``); ``benchmarks.training --gpu`` uses it too.

    program = random_token_program(folder, preset="small", seq_len=512, batch_size=128, steps=40)
    run = measure_lm_training(program, device=torch.device("cuda"), steps=40, bf16=True)
    run.tokens_per_s, run.model_flops_per_s / peak_bf16_flops(run.device_name)

Model FLOPs per token (PaLM, appendix B; nanoGPT's ``estimate_mfu``): ``6 N + 12 L d T`` for
a forward and backward pass, N the parameters that multiply (every parameter but the position
table, a lookup; the tied token embedding counted once, as the LM head's matmul), L layers,
d the width, T the sequence length (attention's QK^T and AV, causal masking not halved). The
small preset at T = 512: N ~ 13.6 M, 6 N = 82 M and 12 L d T = 14 M FLOPs per token.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.program import GRAD_CLIP_NORM
from training.trainers import lm

# Dense bf16 tensor-core peaks from NVIDIA's data sheets (no sparsity), by fragments of
# torch.cuda.get_device_name(): the first entry whose fragments are all in the name wins, so
# each part's variants come before its plain name ("NVIDIA H100 80GB HBM3" is the SXM part).
_BF16_PEAKS: tuple[tuple[tuple[str, ...], float, str], ...] = (
    (("H200", "NVL"), 835e12, "H200 NVL"),
    (("H200",), 989e12, "H200 SXM"),
    (("H100", "PCIe"), 756e12, "H100 PCIe"),
    (("H100", "NVL"), 835e12, "H100 NVL"),
    (("H100",), 989e12, "H100 SXM"),
    (("A100",), 312e12, "A100"),
)


def peak_bf16_flops(device_name: str) -> tuple[float, str] | None:
    """The data-sheet dense bf16 peak (FLOP/s) of a GPU by its name, and the part it was read
    for: ``"NVIDIA H100 80GB HBM3"`` -> (989e12, "H100 SXM"); None for a GPU not listed."""
    for fragments, flops, part in _BF16_PEAKS:
        if all(fragment in device_name for fragment in fragments):
            return flops, part
    return None


def lm_flops_per_token(model: nn.Module, preset: lm.LmPreset, *, seq_len: int) -> tuple[int, int]:
    """(model FLOPs per trained token, N) for a GPT-2 ``model`` of ``preset``'s shape at
    ``seq_len``: see the module docstring. N is the parameters once each, less the position
    table (``transformer.wpe``)."""
    params = sum(p.numel() for p in model.parameters())  # tied weights are one Parameter
    positions = model.get_submodule("transformer.wpe")
    matmul_params = params - sum(p.numel() for p in positions.parameters())
    attention = 12 * preset.n_layer * preset.n_embd * seq_len
    return 6 * matmul_params + attention, matmul_params


def random_token_program(
    folder: Path,
    *,
    preset: str,
    seq_len: int,
    batch_size: int,
    steps: int,
    tokens: int = 1_000_000,
    seed: int = 0,
) -> lm.LmTrainProgram:
    """An ``LmTrainProgram`` over ``tokens`` uniformly random token ids in the preset's
    vocabulary, written to ``folder``: the work per step of real text, with no corpus to read
    or tokeniser to train (throughput does not depend on which ids are trained on)."""
    vocab_size = lm.lm_preset(preset).vocab_size
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=tokens).astype(lm.token_dtype(vocab_size))
    np.save(folder / "train.npy", ids)
    np.save(folder / "val.npy", ids[: seq_len * 4])
    return lm.LmTrainProgram.from_params(
        {
            "train_tokens": str(folder / "train.npy"),
            "val_tokens": str(folder / "val.npy"),
            "preset": preset,
            "vocab_size": vocab_size,
            "seq_len": seq_len,
            "batch_size": batch_size,
            "max_steps": steps,
            "learning_rate": 3e-4,
            "seed": seed,
        }
    )


@dataclass(frozen=True, kw_only=True)
class TrainingRun:
    """One timed run of the bare loop."""

    preset: str
    device: str
    device_name: str
    """``torch.cuda.get_device_name`` on a GPU, ``cpu`` otherwise."""
    dtype: str
    """``bf16`` (autocast, fp32 master weights) or ``fp32``."""
    compiled: bool
    """The model ran under ``torch.compile``."""
    steps: int
    """Timed steps (the warm-up steps before them not counted)."""
    tokens_per_step: int
    seconds: float
    tokens_per_s: float
    params: int
    """Every parameter, once."""
    matmul_params: int
    """N of the FLOPs estimate: ``params`` less the position table."""
    flops_per_token: int
    model_flops_per_s: float
    final_loss: float
    """The last step's loss: finite, or the run measured something broken."""


def measure_lm_training(
    program: lm.LmTrainProgram,
    *,
    device: torch.device,
    steps: int,
    warmup_steps: int = 5,
    bf16: bool,
    compile_model: bool = False,
) -> TrainingRun:
    """``warmup_steps`` then ``steps`` timed optimiser steps of ``program`` on ``device``, each
    as the trainer's own loop does it (rate set, loss, backward, clip, AdamW step), under bf16
    autocast when ``bf16``. The batches are made and moved to the device before the clock
    starts, as a prefetching data loader would have them ready; a GPU is synchronised at both
    ends of the timed steps."""
    if steps < 1 or warmup_steps < 0:
        raise ValueError(f"need steps >= 1 and warmup_steps >= 0, not {steps}, {warmup_steps}")
    model: nn.Module = program.build_model()
    model.to(device)  # in place: a module's .to moves its own parameters
    preset = lm.lm_preset(program.preset)
    flops_per_token, matmul_params = lm_flops_per_token(model, preset, seq_len=program.seq_len)
    optimizer = program.build_optimizer(model)
    model.train()
    stepped: nn.Module = torch.compile(model) if compile_model else model  # type: ignore[assignment]
    total = warmup_steps + steps
    batches = [program.batch(step, rank=0, world_size=1).to(device) for step in range(total)]
    started = 0.0
    loss = torch.zeros(())
    for step, batch in enumerate(batches):
        if step == warmup_steps:
            _synchronize(device)
            started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = program.learning_rate(step)
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        )
        with autocast:
            loss = program.loss(stepped, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        optimizer.step()
    _synchronize(device)
    seconds = time.perf_counter() - started
    tokens_per_s = steps * program.tokens_per_step / seconds
    return TrainingRun(
        preset=program.preset,
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        dtype="bf16" if bf16 else "fp32",
        compiled=compile_model,
        steps=steps,
        tokens_per_step=program.tokens_per_step,
        seconds=seconds,
        tokens_per_s=tokens_per_s,
        params=sum(p.numel() for p in model.parameters()),
        matmul_params=matmul_params,
        flops_per_token=flops_per_token,
        model_flops_per_s=tokens_per_s * flops_per_token,
        final_loss=float(loss.item()),
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
