"""One engine per task, each running a batch on one device; ``build_engine`` picks by task.

Servers build engines through ``build_engine`` and hold them as ``Engine``:

    engine = build_engine("embed", resolved.path, device="auto", max_length=256)
    engine.load(); engine.warmup()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, overload

from models.engines.base import Engine
from models.engines.classify import TensorClassifierEngine, TextClassifierEngine, is_family_folder
from models.engines.embed import EmbeddingEngine, EmbedResult
from models.engines.generate import GenerationEngine

__all__ = [
    "EmbedResult",
    "EmbeddingEngine",
    "Engine",
    "GenerationEngine",
    "TensorClassifierEngine",
    "TextClassifierEngine",
    "build_engine",
]


@overload
def build_engine(task: Literal["embed"], model_dir: Path, **options: Any) -> EmbeddingEngine: ...
@overload
def build_engine(
    task: Literal["classify"], model_dir: Path, **options: Any
) -> TensorClassifierEngine | TextClassifierEngine: ...
@overload
def build_engine(
    task: Literal["generate"], model_dir: Path, **options: Any
) -> GenerationEngine: ...
@overload
def build_engine(task: str, model_dir: Path, **options: Any) -> Engine: ...


def build_engine(task: str, model_dir: Path, **options: Any) -> Engine:
    """The engine for ``task`` over ``model_dir``, not yet loaded; ``options`` go to its
    constructor (``device``, ``dtype``, ``num_threads``; ``max_length`` for text models;
    ``max_sequences``, ``max_batch_tokens``, ``kv_cache_tokens`` for generate).

    ``devices`` (a list such as ``["cuda:0", "cuda:1"]``, repeats allowed) splits a
    transformers model's layers across them in pipeline stages when it names more than one;
    inputs go to the first. The generation engine takes one device repeated only, a Loom
    family classifier (``digits``) one device only: ``ValueError`` otherwise.

    ``classify`` picks by folder: a config naming a Loom family (``digits``) gets the tensor
    engine, anything else the transformers text engine. Raises ``ValueError`` for a task with
    no engine yet.
    """
    if task == "embed":
        return EmbeddingEngine(model_dir, **options)
    if task == "classify":
        if is_family_folder(model_dir):
            return TensorClassifierEngine(model_dir, **options)
        return TextClassifierEngine(model_dir, **options)
    if task == "generate":
        return GenerationEngine(model_dir, **options)
    raise ValueError(f"task {task} is not served yet")
