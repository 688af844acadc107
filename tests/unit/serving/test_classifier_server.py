"""The classifier replica without Ray: admission, batching, rows back to their callers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from model_folders import make_digits_folder, make_text_classifier_folder
from prometheus_client import REGISTRY

from models.engines import build_engine
from models.store import ModelStore
from serving.config import ModelConfig
from serving.errors import InputRefused, Overloaded
from serving.model_server import ClassifierServer, ModelServer, model_server_deployment


def served(
    tmp_path: Path, name: str, folder: Path, **overrides: object
) -> tuple[ClassifierServer, Path]:
    """A ClassifierServer over ``folder``, registered as ``name`` in a fresh store."""
    store = ModelStore(tmp_path / "store")
    store.register(name, folder, task="classify")
    config = {"name": name, "source": name, "task": "classify", "device": "cpu", **overrides}
    return ClassifierServer(config, str(store.root)), folder


def batches_run(model: str) -> float:
    return REGISTRY.get_sample_value("loom_batch_size_count", {"model": model}) or 0.0


def test_concurrent_calls_share_an_engine_run_and_each_gets_its_own_rows(tmp_path: Path):
    server, folder = served(
        tmp_path,
        "digits-batched",
        make_digits_folder(tmp_path / "digits"),
        batching={"max_batch_size": 64, "max_wait_ms": 0},
    )
    engine = build_engine("classify", folder, device="cpu")
    engine.load()
    rng = np.random.default_rng(1)
    requests = [rng.uniform(0, 16, size=(n, 64)).astype(np.float32) for n in (1, 3, 2, 5)]

    async def fire():
        return await asyncio.gather(*[server.classify(rows) for rows in requests])

    before = batches_run("digits-batched")
    replies = asyncio.run(fire())
    for rows, reply in zip(requests, replies, strict=True):
        assert reply.version == "1"
        assert np.allclose(reply.probabilities, engine.run(rows), atol=1e-6)
    # 4 requests, 11 rows: all queued before the engine was free, so fewer runs than requests
    assert batches_run("digits-batched") - before < len(requests)


def test_a_call_larger_than_the_queue_is_refused_as_overloaded(tmp_path: Path):
    server, _ = served(
        tmp_path, "digits-tight", make_digits_folder(tmp_path / "d"), limits={"max_queued": 2}
    )

    async def scenario() -> None:  # one event loop, as in a replica: the batcher lives on it
        with pytest.raises(Overloaded) as caught:
            await server.classify(np.zeros((3, 64), dtype=np.float32))  # 3 rows > 2
        assert caught.value.retry_after_s >= 1
        reply = await server.classify(np.zeros((2, 64), dtype=np.float32))
        assert reply.probabilities.shape == (2, 10)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "rows",
    [np.zeros((2, 63), dtype=np.float32), np.zeros((2, 64), dtype=np.float64), ["a", "b"]],
    ids=["63-wide", "float64", "texts"],
)
def test_a_tensor_model_refuses_wrong_rows_before_they_join_a_batch(tmp_path: Path, rows):
    server, _ = served(tmp_path, "digits-checked", make_digits_folder(tmp_path / "d"))
    with pytest.raises(InputRefused, match="input must"):  # the gateway answers 400
        asyncio.run(server.classify(rows))
    assert server._batcher.queued_inputs == 0


def test_a_tensor_models_info_says_it_takes_64_features_and_names_ten_digits(tmp_path: Path):
    server, _ = served(tmp_path, "digits-info", make_digits_folder(tmp_path / "d"))
    info = server.info()
    assert (info["task"], info["version"]) == ("classify", "1")
    assert (info["input"], info["features"]) == ("tensor", 64)
    assert info["labels"] == [str(d) for d in range(10)]


def test_a_text_model_is_served_with_its_labels_and_the_engines_answers(tmp_path: Path):
    folder = make_text_classifier_folder(tmp_path / "sentiment", labels=("neg", "pos"))
    server, _ = served(tmp_path, "sentiment", folder)
    info = server.info()
    assert (info["input"], info["features"], info["labels"]) == ("text", None, ["neg", "pos"])
    engine = build_engine("classify", folder, device="cpu")
    engine.load()
    texts = ["a fine film", "awful"]

    async def scenario() -> None:
        reply = await server.classify(texts)
        assert np.allclose(reply.probabilities, engine.run(texts), atol=1e-6)
        with pytest.raises(InputRefused, match="strings"):  # the gateway answers 400
            await server.classify([np.zeros(64, dtype=np.float32)])

    asyncio.run(scenario())


def test_classify_and_embed_models_get_their_own_replica_classes():
    def deployment_class(task: str) -> type:
        config = ModelConfig(name="m", source="m", task=task)
        return model_server_deployment(config, {}).func_or_class

    assert deployment_class("classify") is ClassifierServer
    assert deployment_class("embed") is ModelServer
