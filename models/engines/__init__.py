"""One engine per task, each running a batch on one device; ``build_engine`` picks by task.

Servers build engines through ``build_engine`` and hold them as ``Engine``:

    engine = build_engine("embed", resolved.path, device="auto", max_length=256)
    engine.load(); engine.warmup()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.engines.base import Engine
from models.engines.embed import EmbeddingEngine, EmbedResult

__all__ = ["EmbedResult", "EmbeddingEngine", "Engine", "build_engine"]


def build_engine(task: str, model_dir: Path, **options: Any) -> Engine:
    """The engine for ``task`` over ``model_dir``, not yet loaded; ``options`` go to its
    constructor (``device``, ``dtype``, ``max_length``, ``num_threads`` for embed).

    Raises ``ValueError`` for a task with no engine yet.
    """
    if task == "embed":
        return EmbeddingEngine(model_dir, **options)
    raise ValueError(f"task {task} is not served yet")
