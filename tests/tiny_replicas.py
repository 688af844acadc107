"""Replicas over tiny models, in-process (no Ray): what the replica and gateway unit tests
drive.

    replica = tiny_generation_replica(tmp_path, "gen", generation={"max_sequences": 1})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model_folders import make_tiny_gpt2_folder

from models.store import ModelStore
from serving.replicas.generation import GenerationReplica


def tiny_generation_replica(root: Path, name: str, **entry: Any) -> GenerationReplica:
    """A generation replica on CPU over a 2-layer GPT-2 registered as ``name`` in a store
    under ``root``; ``entry`` adds to the model entry (``generation``, ``limits``, ...)."""
    store = ModelStore(root / "store")
    store.register(name, make_tiny_gpt2_folder(root / "gpt2"), task="generate")
    config = {"name": name, "source": name, "task": "generate", "device": "cpu", **entry}
    return GenerationReplica(config, str(store.root))
