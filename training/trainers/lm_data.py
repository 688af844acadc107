"""The ``lm`` trainer's data: the corpus, its split into shards, the tokeniser, token files.

Each step is a pure function of files on disk, so each pipeline stage calls one of them:

    files = corpus_files("stdlib", max_bytes=8_000_000)
    plan = plan_split([str(f) for f in files], shards=8, seed=0)          # splitter
    train_tokenizer([Path(f) for f in plan.val_files + sum(plan.train_shards, [])],
                    vocab_size=4096, out_dir=ws.tokenizer_dir)
    tokenise_files(map(Path, plan.train_shards[3]), tokenizer_dir=..., out_path=ws.shard_tokens(3))
    merge_token_files([ws.shard_tokens(k) for k in range(8)], ws.train_tokens)  # merger

Token files are plain ``.npy`` arrays (uint16 for vocabularies up to 65,536 tokens), each
document's ids followed by ``<|endoftext|>``, so the trainer memory-maps them and any tool
can read them. ``training.trainers.lm`` re-exports every name here; import from there.
"""

from __future__ import annotations

import json
import random
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.datasets import TEXT_SUFFIXES, dataset_files, first_escaping_file
from training.workspace import atomic_path

EOS_TOKEN = "<|endoftext|>"
"""The one special token: ends every document, and stands for bos, unk and pad too."""
EOS_TOKEN_ID = 0
"""``<|endoftext|>``'s id: the trainer adds special tokens first, so it is always 0."""

_STDLIB_SKIPPED_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "__pycache__"})
# Why these folders are skipped: site-packages is third-party code, not the standard library
# (130 MB of it in this interpreter); test/ (18 MB) holds fixtures written to be odd on
# purpose (bad encodings, syntax errors, megabytes of generated data) that would skew a
# small corpus; idlelib is one GUI application's sources. What is left is ~670 files, ~11 MB.

_ENCODE_BATCH_DOCS = 256
"""Documents per ``encode_batch`` call: enough to keep both Rust threads busy, few enough that
a batch of large documents stays a few MB of ids."""


# --- the corpus ------------------------------------------------------------------------------


def corpus_files(dataset: str, *, max_bytes: int) -> list[Path]:
    """The corpus's files, deterministic for the same interpreter or folder.

    ``"stdlib"``: the running interpreter's standard library ``.py`` files; anything else: an
    absolute folder, already validated (``training.spec.dataset_errors``), whose ``.txt`` and
    ``.jsonl`` files are read, recursively (not into linked folders; a file that resolves
    outside the folder is a ``ValueError``, ``training.datasets``). Files are sorted by path
    relative to the root and taken in that order while their total size stays within
    ``max_bytes`` (whole files: a budget of 200 KB of stdlib stops before ``_pydecimal.py``,
    228 KB). Raises ``ValueError`` when there are no files, or when the first file alone is
    larger than ``max_bytes``.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, not {max_bytes}")
    if dataset == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        candidates = [
            path
            for path in root.rglob("*.py")
            if not _STDLIB_SKIPPED_DIRS.intersection(path.relative_to(root).parts[:-1])
        ]
    else:
        root = Path(dataset)
        if not root.is_absolute() or not root.is_dir():
            raise ValueError(f"dataset {dataset!r} is neither 'stdlib' nor an absolute folder")
        candidates = dataset_files(root, suffixes=TEXT_SUFFIXES)
        escaped = first_escaping_file(candidates, root)  # a link made after the job's submit
        if escaped is not None:
            raise ValueError(f"{escaped[0]} leads to {escaped[1]}, outside the dataset {root}")
    files = sorted((p for p in candidates if p.is_file()), key=lambda p: p.relative_to(root))
    if not files:
        raise ValueError(f"dataset {dataset!r} has no .txt or .jsonl files (.py for stdlib)")

    chosen: list[Path] = []
    total_bytes = 0
    for path in files:
        size = path.stat().st_size
        if total_bytes + size > max_bytes:
            break
        chosen.append(path)
        total_bytes += size
    if not chosen:
        raise ValueError(
            f"{files[0]} alone is {files[0].stat().st_size} bytes, more than the corpus budget "
            f"of {max_bytes} bytes: raise max_corpus_mb or split the file"
        )
    return chosen


def read_documents(path: Path) -> Iterator[str]:
    """The documents of one corpus file.

    ``.txt`` and ``.py``: the whole file is one document (UTF-8; undecodable bytes become
    U+FFFD rather than failing a job over one stray byte). ``.jsonl``: one document per line,
    its string ``"text"`` field; blank lines are skipped; any other line raises ``ValueError``
    naming the file and the 1-based line.
    """
    if path.suffix != ".jsonl":
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {number}: not JSON ({exc.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f'{path}, line {number}: no string "text" field')
            yield text


# --- the split -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusPlan:
    """The splitter's output: which files each training shard tokenises, and the validation
    files. Every corpus file is in exactly one list."""

    train_shards: list[list[str]]
    """Non-empty lists of file paths, one per shard; shard k's tokens come k-th in the merge."""
    val_files: list[str]

    def to_json(self) -> str:
        return json.dumps({"train_shards": self.train_shards, "val_files": self.val_files})

    @classmethod
    def from_json(cls, text: str) -> CorpusPlan:
        raw = json.loads(text)
        return cls(
            train_shards=[list(shard) for shard in raw["train_shards"]],
            val_files=list(raw["val_files"]),
        )


def plan_split(
    files: Sequence[str | Path], *, shards: int, val_fraction: float = 0.05, seed: int
) -> CorpusPlan:
    """Split ``files`` into validation files and up to ``shards`` training shards.

    A shuffle seeded by ``seed`` (of the sorted paths, so the input's order does not matter),
    then ``round(n * val_fraction)`` validation files (at least one when there are two files
    or more; none for a single file), then the rest dealt round-robin: 20 files, 5 %, 8
    shards -> 1 validation file and 19 training files in shards of 3,3,3,2,2,2,2,2. Fewer
    training files than ``shards`` gives one shard per file, never an empty shard.
    """
    if shards < 1:
        raise ValueError(f"shards must be at least 1, not {shards}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), not {val_fraction}")
    if not files:
        raise ValueError("no files to split")
    order = sorted(str(f) for f in files)
    if len(set(order)) != len(order):
        raise ValueError("a file is listed twice")
    random.Random(seed).shuffle(order)
    n_val = 0 if len(order) < 2 else max(1, round(len(order) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    n_shards = min(shards, len(train))
    return CorpusPlan(
        train_shards=[train[k::n_shards] for k in range(n_shards)], val_files=sorted(val)
    )


# --- the tokeniser ---------------------------------------------------------------------------


def train_tokenizer(files: Sequence[Path], *, vocab_size: int, out_dir: Path) -> None:
    """Train a byte-level BPE (GPT-2's scheme) on ``files``' documents; save it in ``out_dir``.

    Saved as a ``PreTrainedTokenizerFast`` (``tokenizer.json`` + ``tokenizer_config.json``),
    so ``AutoTokenizer.from_pretrained(out_dir, local_files_only=True)`` loads it.
    ``<|endoftext|>`` is id 0 and the eos, bos, unk and pad token; byte-level means any text
    encodes with no unknowns. The same files give the same tokeniser. A small corpus may stop
    short of ``vocab_size`` (no pair left to merge): read the size back with
    ``tokenizer_vocab_size``. Written atomically: ``out_dir`` is whole or absent.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # all 256 byte symbols from the start, so no byte is ever unknown
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_all_documents(files), trainer)
    if bpe.token_to_id(EOS_TOKEN) != EOS_TOKEN_ID:
        raise RuntimeError(f"{EOS_TOKEN} got id {bpe.token_to_id(EOS_TOKEN)}, not 0")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )
    with atomic_path(out_dir) as temp:
        tokenizer.save_pretrained(str(temp))


def tokenizer_vocab_size(tokenizer_dir: Path) -> int:
    """The tokeniser's real vocabulary size (special token included): the model's vocab."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()


def _all_documents(files: Sequence[Path]) -> Iterator[str]:
    for path in files:
        yield from read_documents(Path(path))


# --- token files -----------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (2 bytes a token: 8 MB of stdlib ~ 5 MB of ids), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def tokenise_files(files: Sequence[Path], *, tokenizer_dir: Path, out_path: Path) -> int:
    """Encode every document of ``files`` (in order), each followed by ``<|endoftext|>``, into
    one ``.npy`` at ``out_path`` (written atomically); the number of tokens written."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    dtype = token_dtype(tokenizer.get_vocab_size())
    eos = np.array([EOS_TOKEN_ID], dtype=dtype)
    pieces: list[np.ndarray] = []
    batch: list[str] = []

    def flush() -> None:
        # encode_batch_fast: both cores, and no character offsets computed (we never use them)
        for encoding in tokenizer.encode_batch_fast(batch, add_special_tokens=False):
            pieces.extend((np.asarray(encoding.ids, dtype=dtype), eos))
        batch.clear()

    for document in _all_documents(files):
        batch.append(document)
        if len(batch) == _ENCODE_BATCH_DOCS:
            flush()
    flush()
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    _save_npy(tokens, out_path)
    return int(tokens.size)


def merge_token_files(paths: Sequence[Path], out_path: Path) -> int:
    """Concatenate token files in the given order into one ``.npy`` (atomically); its length.

    Streams through a memory map, so the merge holds no more than the page cache does."""
    if not paths:
        raise ValueError("no token files to merge")
    parts = [np.load(path, mmap_mode="r") for path in paths]
    dtypes = {part.dtype for part in parts}
    if len(dtypes) != 1:
        raise ValueError(f"token files of different dtypes: {sorted(map(str, dtypes))}")
    total = sum(part.size for part in parts)
    if total == 0:
        _save_npy(np.zeros(0, dtype=parts[0].dtype), out_path)
        return 0
    with atomic_path(out_path) as temp:
        merged = np.lib.format.open_memmap(temp, mode="w+", dtype=parts[0].dtype, shape=(total,))
        start = 0
        for part in parts:
            merged[start : start + part.size] = part
            start += part.size
        merged.flush()
        del merged
    return int(total)


def _save_npy(array: np.ndarray, out_path: Path) -> None:
    # through a file object: np.save(path) would append ".npy" to the temporary name
    with atomic_path(out_path) as temp, temp.open("wb") as out:
        np.save(out, array)
