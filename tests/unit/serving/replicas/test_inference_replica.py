"""The embed/classify replica without Ray: admission, batching, rows back to their callers,
parts skipped when their deadline passed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from model_folders import make_digits_folder, make_text_classifier_folder

from models.engines import build_engine
from models.store import ModelStore
from serving.config import ModelConfig, PoolConfig
from serving.messages import ClassifyReply, Envelope, InferCall, InputRefused, Overloaded
from serving.replicas.deployment import replica_deployment
from serving.replicas.generation import GenerationReplica
from serving.replicas.inference import InferenceReplica


def served(
    tmp_path: Path, name: str, folder: Path, **overrides: object
) -> tuple[InferenceReplica, Path]:
    """A classifier's replica over ``folder``, registered as ``name`` in a fresh store."""
    store = ModelStore(tmp_path / "store")
    store.register(name, folder, task="classify")
    config = {"name": name, "source": name, "task": "classify", "device": "cpu", **overrides}
    return InferenceReplica(config, str(store.root)), folder


async def classify(server: InferenceReplica, rows: Any) -> ClassifyReply:
    """One request's call, as the gateway makes it."""
    reply = await server.infer(InferCall.join([(Envelope("r-1"), rows)]))
    assert isinstance(reply.rows, ClassifyReply)
    return reply.rows


def batches_run(server: InferenceReplica, model: str) -> int:
    return server.stats.observations(model, "batch_size")


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
        return await asyncio.gather(*[classify(server, rows) for rows in requests])

    before = batches_run(server, "digits-batched")
    replies = asyncio.run(fire())
    for rows, reply in zip(requests, replies, strict=True):
        assert reply.version == "1"
        assert np.allclose(reply.probabilities, engine.run(rows), atol=1e-6)
    # 4 requests, 11 rows: all queued before the engine was free, so fewer runs than requests
    assert batches_run(server, "digits-batched") - before < len(requests)


def test_a_call_larger_than_the_queue_is_refused_as_overloaded(tmp_path: Path):
    server, _ = served(
        tmp_path, "digits-tight", make_digits_folder(tmp_path / "d"), limits={"max_queued": 2}
    )

    async def scenario() -> None:  # one event loop, as in a replica: the batcher lives on it
        with pytest.raises(Overloaded) as caught:
            await classify(server, np.zeros((3, 64), dtype=np.float32))  # 3 rows > 2
        assert caught.value.retry_after_s >= 1
        reply = await classify(server, np.zeros((2, 64), dtype=np.float32))
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
        asyncio.run(classify(server, rows))
    assert server._only is not None
    assert server._only.batcher.admitted_inputs == 0


def test_a_tensor_models_info_says_it_takes_64_features_and_names_ten_digits(tmp_path: Path):
    server, _ = served(tmp_path, "digits-info", make_digits_folder(tmp_path / "d"))
    info = asyncio.run(server.info())
    assert (info["task"], info["version"]) == ("classify", "1")
    assert (info["input"], info["features"]) == ("tensor", 64)
    assert info["labels"] == [str(d) for d in range(10)]


def test_a_text_model_is_served_with_its_labels_and_the_engines_answers(tmp_path: Path):
    folder = make_text_classifier_folder(tmp_path / "sentiment", labels=("neg", "pos"))
    server, _ = served(tmp_path, "sentiment", folder)
    info = asyncio.run(server.info())
    assert (info["input"], info["features"], info["labels"]) == ("text", None, ["neg", "pos"])
    engine = build_engine("classify", folder, device="cpu")
    engine.load()
    texts = ["a fine film", "awful"]

    async def scenario() -> None:
        reply = await classify(server, texts)
        assert np.allclose(reply.probabilities, engine.run(texts), atol=1e-6)
        with pytest.raises(InputRefused, match="strings"):  # the gateway answers 400
            await classify(server, [np.zeros(64, dtype=np.float32)])

    asyncio.run(scenario())


def test_each_entry_kind_gets_its_replica_class():
    def deployment_class(config: ModelConfig | PoolConfig) -> type:
        return replica_deployment(config).func_or_class

    assert deployment_class(ModelConfig(name="m", source="m", task="classify")) is InferenceReplica
    assert deployment_class(ModelConfig(name="m", source="m", task="embed")) is InferenceReplica
    assert deployment_class(ModelConfig(name="g", source="g", task="generate")) is (
        GenerationReplica
    )
    pool = PoolConfig(name="p", task="classify", multiplex={"models": ["a@1"]})
    assert issubclass(deployment_class(pool), InferenceReplica)  # with a multiplexed loader


def test_a_part_whose_deadline_passed_before_the_engine_ran_is_skipped(tmp_path: Path):
    server, _ = served(tmp_path, "digits-deadline", make_digits_folder(tmp_path / "d"))
    rows = np.zeros((2, 64), dtype=np.float32)
    call = InferCall.join([(Envelope("gone", deadline_s=0.0), rows), (Envelope("live"), rows[:1])])

    reply = asyncio.run(server.infer(call))

    assert reply.skipped == frozenset({0})  # the gateway's 504 for it has already gone out
    assert [None if r is None else len(r) for r in reply.part_rows([2, 1])] == [None, 1]
    assert server.stats.counted("digits-deadline", "inputs") == 1  # only the live part's row
    assert server.stats.counted("digits-deadline", "expired") == 2
