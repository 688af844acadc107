"""What a job for the ``lm`` trainer may ask: a GPT-2-style model trained on a text corpus.

Plain pydantic, no torch: the gateway reads specs with this alone.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from training.spec_fields import JobSpec, StrictModel

MAX_STEPS = 100_000
"""Most optimiser steps one job may ask for: with batch_size and seq_len bounded too, the
bound on a job's compute (a tiny preset trains ~5 steps/s on 2 cores: 100,000 is ~6 hours)."""
MAX_BATCH_SIZE = 4096


class LmHyperparameters(StrictModel):
    preset: Literal["tiny", "small", "base"] = Field(
        "tiny", description="Model size preset (layers, width, heads)."
    )
    learning_rate: float = Field(3e-4, gt=0, description="Peak AdamW learning rate.")
    batch_size: int = Field(
        16,
        ge=1,
        le=MAX_BATCH_SIZE,
        description="Global batch, in sequences per optimiser step, over all workers (at most "
        "4096).",
    )
    max_steps: int = Field(
        200, ge=1, le=MAX_STEPS, description="Optimiser steps to train for (at most 100,000)."
    )
    seq_len: int = Field(128, ge=8, le=4096, description="Tokens per training sequence.")
    checkpoint_every_steps: int = Field(
        50,
        ge=1,
        le=MAX_STEPS,
        description="Steps between checkpoints; a lost worker restarts from the last.",
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
    seed: int = Field(
        0,
        ge=0,
        le=2**32 - 1,
        description="Seeds the split, the weights and the batch order (0 to 2**32 - 1).",
    )


class LmEval(StrictModel):
    max_perplexity: float | None = Field(
        None, gt=1, description="Validation perplexity above this fails the job; None: no gate."
    )


class LmJobSpec(JobSpec):
    """A job for the ``lm`` trainer."""

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
