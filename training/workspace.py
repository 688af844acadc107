"""A job's working folder: where its stages leave what the next stage reads.

    ws = JobWorkspace(env.jobs_dir, "job-1f2e")
    ws.shard_tokens(3)        # .../job-1f2e/shards/00003.npy
    ws.remove()               # a cancelled job leaves nothing behind

Every path a stage writes is derived here from the job's id, never from a request, so no
client-supplied string reaches the filesystem. Files are written whole and then renamed
(``atomic_path``), so a reader sees either nothing or the complete file, and a stage re-run
after a crash overwrites its own half-written output.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # fullmatch: "$" passes "id\n"


@dataclass(frozen=True)
class JobWorkspace:
    root: Path
    """The jobs folder (``LoomEnv.jobs_dir``)."""
    job_id: str

    def __post_init__(self) -> None:
        if not _JOB_ID.fullmatch(self.job_id) or self.job_id in (".", ".."):
            raise ValueError(f"not a job id: {self.job_id!r}")

    @property
    def path(self) -> Path:
        return self.root / self.job_id

    @property
    def split_file(self) -> Path:
        """The splitter's plan (JSON): which inputs go to which shard or member."""
        return self.path / "split.json"

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    def shard_tokens(self, shard: int) -> Path:
        return self.path / "shards" / f"{shard:05d}.npy"

    @property
    def train_tokens(self) -> Path:
        """The merger's output: every training shard's tokens, in shard order."""
        return self.path / "merged" / "train.npy"

    @property
    def val_tokens(self) -> Path:
        return self.path / "merged" / "val.npy"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def member_dir(self, member: str) -> Path:
        return self.path / "members" / member

    @property
    def holds_dir(self) -> Path:
        """Debug hold requests for the train stage (``training.holds``; tests only)."""
        return self.path / "holds"

    @property
    def export_dir(self) -> Path:
        """The trained model as the store will register it (safetensors + config)."""
        return self.path / "export"

    def ensure(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def remove(self) -> None:
        """Delete everything the job wrote here (a cancel's clean-up); no error if absent."""
        shutil.rmtree(self.path, ignore_errors=True)


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target``; renamed onto it when the block ends without error.

    Works for a file or a folder the block creates at the yielded path."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield temp
        if target.is_dir() and temp.is_dir():
            shutil.rmtree(target)
        os.replace(temp, target)
    finally:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        elif temp.exists():
            temp.unlink()
