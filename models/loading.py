"""Loading a transformers model and tokenizer from a local folder, safely.

Every load is pinned to the folder on disk and to safetensors: ``local_files_only=True`` (no
hub look-ups at run time), ``use_safetensors=True`` and ``trust_remote_code=False`` are passed
explicitly, and a folder holding any pickle-based weights is refused before transformers sees
it, so no code in a weights file or a repo's ``modeling_*.py`` ever runs.

    loaded = load_pretrained(path, task="embed", device=torch.device("cpu"), dtype=torch.float32)
    loaded.model(**loaded.tokenizer(["hello"], return_tensors="pt"))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from models.errors import StoreError
from models.weights import require_safe_weights

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Which transformers head each task loads: embed reads hidden states, so the bare encoder.
_MODEL_CLASS_BY_TASK: dict[str, str] = {
    "embed": "AutoModel",
    "generate": "AutoModelForCausalLM",
    "classify": "AutoModelForSequenceClassification",
}


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode on its device, and the tokenizer that goes with it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    """A transformers tokenizer (fast where the folder has ``tokenizer.json``)."""
    device: torch.device
    dtype: torch.dtype


def load_pretrained(
    path: Path, *, task: str, device: torch.device, dtype: torch.dtype
) -> LoadedModel:
    """Load the model for ``task`` and its tokenizer from ``path``, in eval mode on ``device``.

    Raises ``UnsafeWeights`` for a folder with non-safetensors weights or none at all,
    ``StoreError`` for a missing folder, and ``ValueError`` for an unknown task.
    """
    if task not in _MODEL_CLASS_BY_TASK:
        known = ", ".join(sorted(_MODEL_CLASS_BY_TASK))
        raise ValueError(f"unknown task {task!r}: expected one of {known}")
    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"model folder {path} does not exist or is not a folder")
    require_safe_weights(path)

    # Imported here, not at the top: transformers takes seconds to import, and processes that
    # only read results (a gateway importing EmbedResult) never load a model.
    import transformers

    model_class = getattr(transformers, _MODEL_CLASS_BY_TASK[task])
    model = model_class.from_pretrained(
        str(path),
        dtype=dtype,
        use_safetensors=True,
        trust_remote_code=False,
        local_files_only=True,
    )
    model.to(device)
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(path),
        trust_remote_code=False,
        local_files_only=True,
    )
    return LoadedModel(model=model, tokenizer=tokenizer, device=device, dtype=dtype)


def pick_max_length(
    loaded: LoadedModel, requested: int | None, preferred: int | None = None
) -> int:
    """The token limit of a text model: ``requested`` (refused past the model's positions),
    else ``preferred`` (what the model was trained at, e.g. sentence-transformers' 256 for
    MiniLM), else the smaller of the tokenizer's and the model's limits."""
    position_limit = int(getattr(loaded.model.config, "max_position_embeddings", 0) or 0)
    if requested is not None:
        if position_limit and requested > position_limit:
            raise ValueError(
                f"max_length {requested} exceeds the model's {position_limit} positions"
            )
        return requested
    if preferred is not None and preferred > 0:
        return preferred
    # tokenizers without a limit report a huge sentinel (1e30); positions bound us anyway
    limits = [int(min(loaded.tokenizer.model_max_length, 1 << 30)), position_limit]
    return min(limit for limit in limits if limit > 0)
