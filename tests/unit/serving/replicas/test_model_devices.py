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
from serving.messages import EmbedReply, Envelope, InferCall
from serving.replicas.inference import InferenceReplica


async def embed(replica: InferenceReplica, texts: list[str]) -> EmbedReply:
    reply = await replica.infer(InferCall.join([(Envelope("r-1"), texts)]))
    assert isinstance(reply.rows, EmbedReply)
    return reply.rows


def test_a_replica_with_two_cpu_stages_embeds_as_the_one_device_replica(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    ensure_bundled(store)
    entry = {"name": "minilm", "source": "minilm", "device": "cpu", "torch_threads": 1}
    whole = InferenceReplica(entry, str(store.root))
    split = InferenceReplica({**entry, "devices": ["cpu", "cpu"]}, str(store.root))
    assert split._only is not None
    stages = split._only.model.engine._require_loaded().model.loom_stages
    assert [list(r) for r in stages.layer_ranges] == [[0, 1, 2], [3, 4, 5]]  # MiniLM's 6 layers
    texts = ["a sharded model", "the same answer"]
    one, two = asyncio.run(embed(whole, texts)), asyncio.run(embed(split, texts))
    np.testing.assert_allclose(two.vectors, one.vectors, atol=1e-5)


def test_devices_needs_at_least_two_entries() -> None:
    with pytest.raises(ConfigError, match=r"models\.0\.devices"):
        parse_config({"models": [{"name": "m", "source": "m", "devices": ["cuda:0"]}]})
