"""The embedding engine: texts in, L2-normalised mean-pooled sentence vectors out.

This is sentence-transformers' recipe for models like all-MiniLM-L6-v2 (encoder, mean over
real tokens, normalise), done directly on transformers so serving needs nothing else:

    engine = EmbeddingEngine(model_dir, device="auto")
    engine.load(); engine.warmup()
    result = engine.run(["a sentence", "another"])
    result.vectors.shape, result.token_counts      # (2, 384), (4, 3)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.engines.base import PretrainedEngine
from models.loading import pick_max_length

_WARMUP_TEXTS = (
    "Loom warms the model up.",
    "A second, slightly longer sentence so the batch needs padding to line up.",
    "Short.",
    "The first real request should pay no one-off costs.",
)


@dataclass(frozen=True)
class EmbedResult:
    """One batch's embeddings, in input order."""

    vectors: np.ndarray
    """(n, dim) float32 on the CPU, each row of L2 norm 1."""
    token_counts: tuple[int, ...]
    """Tokens per input after truncation, special tokens included (usage.prompt_tokens)."""


class EmbeddingEngine(PretrainedEngine):
    """Embeds text with a mean-pooling sentence encoder from a local folder.

    Driven by one thread at a time (see ``models.engines.base``). ``device``/``dtype`` take
    the text of ``models.device``; ``max_length`` (tokens) defaults to the model's own limit;
    ``num_threads`` sets torch's intra-op threads on ``load()``; ``devices`` splits the encoder's
    layers across several devices (``models.parallel``).
    """

    task = "embed"

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_length: int | None = None,
        num_threads: int | None = None,
        devices: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            model_dir, device=device, dtype=dtype, num_threads=num_threads, devices=devices
        )
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens ([CLS], [SEP]): {max_length}")
        self._requested_max_length = max_length
        self._max_length = 0

    def load(self) -> None:
        """Load weights and tokenizer onto the device (safetensors only), in eval mode."""
        _require_mean_pooling(self.model_dir)
        loaded = self._load_pretrained()
        self._max_length = pick_max_length(
            loaded, self._requested_max_length, self._trained_max_length()
        )
        self._loaded = loaded

    def warmup(self) -> None:
        """Embed a small padded batch, so kernels and allocator pools exist before traffic."""
        self.run(_WARMUP_TEXTS)

    @property
    def dim(self) -> int:
        """Length of each vector (the encoder's hidden size, 384 for MiniLM)."""
        return int(self._require_loaded().model.config.hidden_size)

    @property
    def max_length(self) -> int:
        """Tokens per input, special tokens included; longer inputs are truncated to it."""
        self._require_loaded()
        return self._max_length

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text becomes after truncation, special tokens included; no forward pass."""
        tokenizer = self._require_loaded().tokenizer
        if not texts:
            return []
        encoded = tokenizer(
            _as_text_list(texts), truncation=True, max_length=self._max_length, padding=False
        )
        return [len(ids) for ids in encoded["input_ids"]]

    def run(self, texts: Sequence[str]) -> EmbedResult:
        """Embed ``texts`` in one forward pass; padded only to the longest text in the batch."""
        loaded = self._require_loaded()
        if not texts:
            return EmbedResult(vectors=np.zeros((0, self.dim), dtype=np.float32), token_counts=())
        batch = loaded.tokenizer(
            _as_text_list(texts),
            padding=True,
            truncation=True,
            max_length=self._max_length,
            return_tensors="pt",
        )
        batch = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}
        mask = batch["attention_mask"]
        with torch.inference_mode():
            hidden = loaded.model(**batch).last_hidden_state  # (B, T, H) in the model's dtype
            vectors = _mean_pool(hidden, mask)
            vectors = F.normalize(vectors, p=2, dim=1)
            token_counts = mask.sum(dim=1)
        return EmbedResult(
            vectors=vectors.cpu().numpy(),
            token_counts=tuple(token_counts.cpu().tolist()),
        )

    def _trained_max_length(self) -> int | None:
        """What the model was trained and evaluated at (sentence-transformers' config): 256
        for MiniLM, below its 512 positions."""
        sbert_config = self.model_dir / "sentence_bert_config.json"
        if not sbert_config.is_file():
            return None
        max_seq_length = json.loads(sbert_config.read_text()).get("max_seq_length")
        return max_seq_length if isinstance(max_seq_length, int) else None


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # (B, T, H) -> (B, H): mean over real tokens only, padding masked out. One batched matmul,
    # (B, 1, T) @ (B, T, H), so no masked (B, T, H) copy is made; summed in float32 so
    # half-precision models keep their digits over long inputs.
    weights = mask.to(torch.float32).unsqueeze(1)  # (B, 1, T)
    summed = torch.bmm(weights, hidden.to(torch.float32)).squeeze(1)  # (B, H)
    counts = weights.sum(dim=2).clamp(min=1e-9)  # (B, 1); the clamp as sentence-transformers
    return summed / counts


def _as_text_list(texts: Sequence[str]) -> list[str]:
    items = list(texts)
    for index, text in enumerate(items):
        if not isinstance(text, str):
            raise TypeError(f"input {index} is {type(text).__name__}, not str")
    return items


def _require_mean_pooling(model_dir: Path) -> None:
    """Refuse a sentence-transformers folder that pools otherwise (CLS, max): wrong vectors."""
    pooling_config = model_dir / "1_Pooling" / "config.json"
    if not pooling_config.is_file():
        return  # a plain encoder folder: mean pooling is the engine's definition
    config = json.loads(pooling_config.read_text())
    modes = sorted(k for k, v in config.items() if k.startswith("pooling_mode_") and v is True)
    if modes != ["pooling_mode_mean_tokens"]:
        raise ValueError(
            f"{pooling_config} asks for pooling {modes or 'none'}; "
            f"this engine does mean pooling only"
        )
