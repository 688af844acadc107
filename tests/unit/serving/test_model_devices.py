"""A replica configured with several devices serves its model split across them (pipeline
stages), answering as the unsplit model does."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from models.bundled import ensure_bundled
from models.store import ModelStore
from serving.config import ConfigError, parse_config
from serving.model_server import ModelServer


def test_a_replica_with_two_cpu_stages_embeds_as_the_one_device_replica(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    ensure_bundled(store)
    entry = {"name": "minilm", "source": "minilm", "device": "cpu", "torch_threads": 1}
    whole = ModelServer(entry, str(store.root))
    split = ModelServer({**entry, "devices": ["cpu", "cpu"]}, str(store.root))
    stages = split._engine._require_loaded().model.loom_stages
    assert [list(r) for r in stages.layer_ranges] == [[0, 1, 2], [3, 4, 5]]  # MiniLM's 6 layers
    texts = ["a sharded model", "the same answer"]
    one, two = asyncio.run(whole.embed(texts)), asyncio.run(split.embed(texts))
    np.testing.assert_allclose(two.vectors, one.vectors, atol=1e-5)


def test_devices_needs_at_least_two_entries() -> None:
    with pytest.raises(ConfigError, match=r"models\.0\.devices"):
        parse_config({"models": [{"name": "m", "source": "m", "devices": ["cuda:0"]}]})
