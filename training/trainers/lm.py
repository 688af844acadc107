"""The ``lm`` trainer: a GPT-2-style language model trained on a text corpus.

The data half (corpus, split, tokeniser, token files) lives in ``lm_data`` and is re-exported
here; this file holds the model and its training as a ``TrainProgram``, which the coordinated
runner runs on W workers and ``train_single_process`` runs on one:

    program = LmTrainProgram.from_params({"train_tokens": ".../train.npy",
        "val_tokens": ".../val.npy", "preset": "tiny", "vocab_size": 4096, "seq_len": 128,
        "batch_size": 16, "max_steps": 200, "learning_rate": 3e-4, "seed": 0})
    model = train_single_process(program)
    export_lm(model, tokenizer_dir=ws.tokenizer_dir, out_dir=ws.export_dir)  # servable folder

The ``lm`` record in ``training.trainers.registry`` names ``LmTrainProgram.from_params`` as
its program (``TRAINERS.build_program(ProgramSpec(kind="lm", ...))``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.program import GRAD_CLIP_NORM, TrainProgram
from training.trainers.lm_data import (
    EOS_TOKEN,
    EOS_TOKEN_ID,
    CorpusPlan,
    corpus_files,
    merge_token_files,
    plan_split,
    read_documents,
    token_dtype,
    tokenise_files,
    tokenizer_vocab_size,
    train_tokenizer,
)
from training.workspace import atomic_path

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel

__all__ = [
    "EOS_TOKEN",
    "EOS_TOKEN_ID",
    "CorpusPlan",
    "LmPreset",
    "LmTrainProgram",
    "build_lm",
    "corpus_files",
    "export_lm",
    "lm_preset",
    "merge_token_files",
    "plan_split",
    "read_documents",
    "token_dtype",
    "tokenise_files",
    "tokenizer_vocab_size",
    "train_single_process",
    "train_tokenizer",
]


# --- the model -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LmPreset:
    """A model size. Parameters, at the preset's vocabulary: tiny ~0.9 M, small ~14 M,
    base ~98 M (GPT-2 small's shape with a 16 k vocabulary)."""

    n_layer: int
    n_embd: int
    """Width; a multiple of ``n_head``."""
    n_head: int
    vocab_size: int
    """The tokeniser's target vocabulary when a job does not name one."""
    n_positions: int
    """The least context the served model gets; ``build_lm`` raises it to ``seq_len``."""


_PRESETS: dict[str, LmPreset] = {
    "tiny": LmPreset(n_layer=2, n_embd=128, n_head=4, vocab_size=4096, n_positions=256),
    "small": LmPreset(n_layer=6, n_embd=384, n_head=6, vocab_size=8192, n_positions=512),
    "base": LmPreset(n_layer=12, n_embd=768, n_head=12, vocab_size=16384, n_positions=1024),
}


def lm_preset(name: str) -> LmPreset:
    """The preset called ``name`` (``tiny``, ``small``, ``base``); ``ValueError`` otherwise."""
    try:
        return _PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown lm preset {name!r}; known: {sorted(_PRESETS)}") from None


def build_lm(preset: LmPreset, *, vocab_size: int, seq_len: int, seed: int) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 of ``preset``'s shape, the same for the same arguments.

    Every dropout is 0, so a training step is a deterministic function of the weights and the
    batch: what lets W data-parallel workers reproduce one worker's run. The context is
    ``max(seq_len, preset.n_positions)`` so a served prompt plus its reply fit; positions past
    ``seq_len`` are never trained, so text quality falls off beyond it. ``<|endoftext|>``
    (id 0) is the eos, bos and pad id.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=max(seq_len, preset.n_positions),
        n_embd=preset.n_embd,
        n_layer=preset.n_layer,
        n_head=preset.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        bos_token_id=EOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=EOS_TOKEN_ID,
    )
    # a private generator would be tidier, but transformers' init draws from the global one
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


# --- the program -----------------------------------------------------------------------------


@dataclass(kw_only=True)
class LmTrainProgram:
    """Next-token prediction on memory-mapped token files, as a ``TrainProgram``.

    program = LmTrainProgram.from_params(params)        # params: see from_params
    batch = program.batch(7, rank=1, world_size=2)      # (batch_size/2, seq_len+1) int64
    loss = program.loss(model, batch)                   # mean cross-entropy, a scalar
    """

    train_tokens: Path
    val_tokens: Path
    preset: str
    vocab_size: int
    seq_len: int
    batch_size: int
    """Global: sequences per optimiser step, over all workers."""
    max_steps: int
    learning_rate_peak: float
    seed: int
    eval_batches: int = 8
    """Validation batches of ``batch_size`` windows each that ``evaluate`` averages over."""
    _train: np.ndarray = field(init=False, repr=False)
    _val: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        lm_preset(self.preset)  # an unknown preset fails here, not in the first build_model
        for name in ("vocab_size", "seq_len", "batch_size", "max_steps", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        # memory-mapped: W workers on one node share the page cache, not W copies
        self._train = np.load(self.train_tokens, mmap_mode="r")
        self._val = np.load(self.val_tokens, mmap_mode="r")
        if self._train.size < self.seq_len + 1:
            raise ValueError(
                f"{self.train_tokens} has {self._train.size} tokens, fewer than one window "
                f"of seq_len + 1 = {self.seq_len + 1}"
            )
        if self._val.size < 2:
            raise ValueError(f"{self.val_tokens} has {self._val.size} tokens; need at least 2")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> LmTrainProgram:
        """Build from a ``ProgramSpec``'s plain params: ``train_tokens``, ``val_tokens``
        (paths), ``preset``, ``vocab_size``, ``seq_len``, ``batch_size``, ``max_steps``,
        ``learning_rate``, ``seed``, and optionally ``eval_batches`` (8)."""
        return cls(
            train_tokens=Path(params["train_tokens"]),
            val_tokens=Path(params["val_tokens"]),
            preset=str(params["preset"]),
            vocab_size=int(params["vocab_size"]),
            seq_len=int(params["seq_len"]),
            batch_size=int(params["batch_size"]),
            max_steps=int(params["max_steps"]),
            learning_rate_peak=float(params["learning_rate"]),
            seed=int(params["seed"]),
            eval_batches=int(params.get("eval_batches", 8)),
        )

    @property
    def global_batch_size(self) -> int:
        return self.batch_size

    @property
    def tokens_per_step(self) -> int:
        """Tokens the model predicts per optimiser step: 16 x 128 = 2048 by default."""
        return self.batch_size * self.seq_len

    @property
    def warmup_steps(self) -> int:
        # 200 steps -> 20 of warm-up; 5000 -> 100
        return min(100, self.max_steps // 10)

    def build_model(self) -> GPT2LMHeadModel:
        return build_lm(
            lm_preset(self.preset), vocab_size=self.vocab_size, seq_len=self.seq_len, seed=self.seed
        )

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """AdamW, betas (0.9, 0.95); weight decay 0.1 on matrices (linear and embedding
        weights) only, none on biases and layer-norm gains (nanoGPT's split)."""
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=self.learning_rate(0), betas=(0.9, 0.95))

    def learning_rate(self, step: int) -> float:
        """Linear warm-up to the peak over ``warmup_steps``, then cosine decay to 10 % of it at
        ``max_steps - 1``: peak 3e-4, 200 steps -> 1.5e-5 at step 0, 3e-4 at 19, 3e-5 at 199."""
        peak, floor = self.learning_rate_peak, 0.1 * self.learning_rate_peak
        if step < self.warmup_steps:
            return peak * (step + 1) / self.warmup_steps
        decay_steps = max(1, self.max_steps - 1 - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))

    def batch(self, step: int, *, rank: int, world_size: int) -> torch.Tensor:
        """Rank ``rank``'s rows of global batch ``step``: ``batch_size`` windows of
        ``seq_len + 1`` tokens at offsets drawn from a generator seeded by (seed, step) alone,
        so a restarted or resized group sees the same data. Rank r of W gets rows
        [r*B/W, (r+1)*B/W): B=16, W=4, r=1 -> rows 4..7. Returns int64 (B/W, seq_len + 1)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if self.batch_size % world_size:
            raise ValueError(
                f"batch_size {self.batch_size} does not split evenly over {world_size} workers"
            )
        rng = np.random.default_rng([self.seed, step])
        offsets = rng.integers(0, self._train.size - self.seq_len, size=self.batch_size)
        per_rank = self.batch_size // world_size
        mine = offsets[rank * per_rank : (rank + 1) * per_rank]
        return _windows(self._train, mine, self.seq_len + 1)

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over every position of ``batch`` (moved to the
        model's device here, so the runner need not know the batch's type)."""
        batch = batch.to(next(model.parameters()).device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(input_ids=inputs).logits  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Mean loss over ``eval_batches`` x ``batch_size`` windows spread evenly over the
        validation tokens (the same windows every call) -> ``val_loss`` and ``perplexity``
        (exp of it). Windows shrink to the validation file when it is shorter than one."""
        window = min(self.seq_len + 1, self._val.size)
        n_windows = self.eval_batches * self.batch_size
        offsets = np.linspace(0, self._val.size - window, n_windows).astype(np.int64)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                losses = [
                    self.loss(model, _windows(self._val, chunk, window)).item()
                    for chunk in np.array_split(offsets, self.eval_batches)
                ]
        finally:
            model.train(was_training)
        val_loss = float(np.mean(losses))
        return {"val_loss": val_loss, "perplexity": math.exp(val_loss)}


def _windows(tokens: np.ndarray, offsets: np.ndarray, length: int) -> torch.Tensor:
    # (len(offsets), length) int64: copies out of the memory map, only these rows
    rows = np.stack([np.asarray(tokens[o : o + length], dtype=np.int64) for o in offsets])
    return torch.from_numpy(rows)


# --- one process -----------------------------------------------------------------------------


def train_single_process(
    program: TrainProgram,
    *,
    steps: int | None = None,
    device: str | torch.device = "cpu",
    on_step: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """The plain torch loop, one process: the reference the coordinated runner must equal and
    the benchmark's bare-loop baseline. For each step: set the rate, mean loss of the whole
    global batch, backward, clip to ``GRAD_CLIP_NORM``, step. ``steps`` (default
    ``program.max_steps``) may stop early; ``on_step(step, loss)`` sees each step's loss."""
    model = program.build_model().to(device)
    optimizer = program.build_optimizer(model)
    model.train()
    for step in range(program.max_steps if steps is None else steps):
        rate = program.learning_rate(step)
        for group in optimizer.param_groups:
            group["lr"] = rate
        loss = program.loss(model, program.batch(step, rank=0, world_size=1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        optimizer.step()
        if on_step is not None:
            on_step(step, loss.item())
    return model


# --- export ----------------------------------------------------------------------------------


def export_lm(model: nn.Module, *, tokenizer_dir: Path, out_dir: Path) -> Path:
    """Write ``model`` (a ``GPT2LMHeadModel``, or a DDP wrapper of one) as a folder Loom's
    generation engine serves: safetensors weights and config, the tokeniser (its
    ``model_max_length`` set to the model's context) and a generation config with the eos.
    Atomic: ``out_dir`` is replaced whole, never half-written. Returns ``out_dir``."""
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerFast

    model = getattr(model, "module", model)  # DDP keeps the model as .module
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"expected a transformers model, got {type(model).__name__}")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir), local_files_only=True)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"the tokeniser has {len(tokenizer)} tokens but the model only "
            f"{model.config.vocab_size}: a token id would have no embedding"
        )
    tokenizer.model_max_length = model.config.n_positions
    with atomic_path(out_dir) as temp:
        model.save_pretrained(str(temp), safe_serialization=True)
        tokenizer.save_pretrained(str(temp))
        GenerationConfig(
            bos_token_id=EOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=EOS_TOKEN_ID
        ).save_pretrained(str(temp))
    return out_dir
