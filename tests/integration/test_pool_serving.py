"""A multiplexed pool through the real gateway on one local Ray: three digits variants share
one replica that holds at most two; each member answers with its own weights, and the load
counter shows the evictions."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from model_folders import make_digits_folder

from models.engines import TensorClassifierEngine, build_engine
from models.settings import LoomEnv
from models.store import ModelStore
from serving.app import LoomServer
from serving.config import parse_config

MEMBERS = {"digits-a": "digits-a@1", "digits-b": "digits-b@2", "digits-c": "digits-c@1"}


@dataclass
class Served:
    url: str
    engines: dict[str, TensorClassifierEngine]
    """Each member's pinned weights in-process: what the pool must answer for it."""


def loaded(folder: Path) -> TensorClassifierEngine:
    engine = build_engine("classify", folder, device="cpu")
    engine.load()
    return engine


@pytest.fixture(scope="module")
def served(
    ray_session: None, tmp_path_factory: pytest.TempPathFactory, free_port: Callable[[], int]
) -> Iterator[Served]:
    home: Path = tmp_path_factory.mktemp("loom-pool")
    env = LoomEnv.from_environ({"LOOM_HOME": str(home)})
    store = ModelStore(env.models_dir)
    folders = {}
    # digits-b has two versions: the pool pins @2, so answering with @1 would show
    for seed, (name, version) in enumerate(
        [("digits-a", "1"), ("digits-b", "1"), ("digits-b", "2"), ("digits-c", "1")], start=1
    ):
        folder = make_digits_folder(home / f"src-{name}-{version}", seed=seed)
        assert store.register(name, folder, task="classify").version == version
        folders[f"{name}@{version}"] = folder
    port = free_port()
    config = parse_config(
        {
            "training": {"enabled": False},  # serving alone: no job scheduler
            "server": {"port": port},
            "models": [
                {
                    "name": "digits-pool",
                    "task": "classify",
                    "multiplex": {"models": list(MEMBERS.values()), "max_models_per_replica": 2},
                    "replicas": 1,
                    "num_cpus": 0.5,
                    "torch_threads": 1,
                }
            ],
        }
    )
    loom = LoomServer(config, env)
    loom.start(ready_timeout_s=300)
    try:
        engines = {name: loaded(folders[ref]) for name, ref in MEMBERS.items()}
        yield Served(f"http://127.0.0.1:{port}", engines)
    finally:
        loom.stop()


def random_pixels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, size=(n, 64)).astype(np.float32)


def infer_body(rows: np.ndarray) -> dict:
    tensor = {"name": "input", "datatype": "FP32", "shape": list(rows.shape)}
    return {"inputs": [tensor | {"data": rows.ravel().tolist()}]}


def infer(served: Served, member: str, rows: np.ndarray) -> httpx.Response:
    return httpx.post(f"{served.url}/v2/models/{member}/infer", json=infer_body(rows), timeout=60)


def probabilities_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    return np.array(output["data"], dtype=np.float32).reshape(output["shape"])


def loads_by_member(served: Served) -> dict[str, float]:
    text = httpx.get(f"{served.url}/metrics", timeout=30).text
    found = re.findall(r'^loom_model_loads_total\{model="([^"]+)"\} (\S+)$', text, re.M)
    totals: dict[str, float] = {}
    for member, value in found:
        totals[member] = totals.get(member, 0.0) + float(value)
    return totals


def test_each_member_answers_with_its_own_weights_and_evictions_show_in_loads(
    served: Served,
) -> None:
    rows = random_pixels(3, seed=7)
    a, b = served.engines["digits-a"].run(rows), served.engines["digits-b"].run(rows)
    assert not np.allclose(a, b, atol=1e-3)  # the variants differ: a mix-up would show

    rounds = 3
    for _ in range(rounds):
        for member, engine in served.engines.items():  # a, b, c, a, b, c, ...
            response = infer(served, member, rows)
            assert response.json()["model_name"] == member
            assert np.allclose(probabilities_of(response), engine.run(rows), atol=1e-6), member

    loads = loads_by_member(served)
    assert set(loads) == set(MEMBERS)
    # 3 members round-robin through 2 slots: least recently used is always the next one
    # asked for, so every request after the first two misses: 3 rounds x 3 = 9 loads > 3
    assert sum(loads.values()) > len(MEMBERS)
    assert sum(loads.values()) == rounds * len(MEMBERS)


def test_members_are_listed_described_and_ready_but_the_pool_name_is_not_callable(
    served: Served,
) -> None:
    listed = httpx.get(f"{served.url}/v1/models", timeout=30).json()
    assert sorted(card["id"] for card in listed["data"]) == sorted(MEMBERS)

    meta = httpx.get(f"{served.url}/v2/models/digits-b", timeout=30).json()
    assert (meta["name"], meta["versions"], meta["platform"]) == (
        "digits-b", ["2"], "loom-classify",
    )  # fmt: skip
    ready = httpx.get(f"{served.url}/v2/models/digits-c/ready", timeout=30)
    assert (ready.status_code, ready.json()["ready"]) == (200, True)
    assert httpx.get(f"{served.url}/v2/health/ready", timeout=30).status_code == 200

    assert infer(served, "digits-pool", random_pixels(1, seed=1)).status_code == 404
    assert infer(served, "digits-d", random_pixels(1, seed=1)).status_code == 404


def test_concurrent_requests_across_more_members_than_slots_all_get_their_own_answers(
    served: Served,
) -> None:
    members = list(MEMBERS) * 8  # 24 requests over 3 members, 2 slots: evictions mid-flight
    rows = [random_pixels(1 + i % 3, seed=200 + i) for i in range(len(members))]

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            return await asyncio.gather(
                *[
                    client.post(f"/v2/models/{member}/infer", json=infer_body(r))
                    for member, r in zip(members, rows, strict=True)
                ]
            )

    responses = asyncio.run(fire())
    for member, r, response in zip(members, rows, responses, strict=True):
        assert np.allclose(probabilities_of(response), served.engines[member].run(r), atol=1e-6)
