"""A multiplexed pool through the real gateway on one local Ray: three digits variants share
one replica that holds at most two; each member answers with its own weights, and the load
counter shows the evictions."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from serving_stack import POOL_MEMBERS as MEMBERS
from serving_stack import SharedStack

from models.engines import TensorClassifierEngine, build_engine
from serving.monitoring.scrape import scrape_sidecars, total


@dataclass
class Served:
    url: str
    engines: dict[str, TensorClassifierEngine]
    """Each member's pinned weights in-process: what the pool must answer for it."""
    served_names: set[str]
    """Every name the shared server answers to (the other modules' models too)."""


def loaded(folder) -> TensorClassifierEngine:
    engine = build_engine("classify", folder, device="cpu")
    engine.load()
    return engine


@pytest.fixture(scope="module")
def served(serving_stack: SharedStack) -> Served:
    """The shared server's ``digits-pool`` (``serving_stack.pool_models``): three members in
    one replica that holds at most two."""
    stack = serving_stack.running()
    engines = {name: loaded(stack.store.resolve(ref).path) for name, ref in MEMBERS.items()}
    return Served(stack.url, engines, stack.served_names())


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
    """Model loads counted under a member's name or the pool's (the shared server's other
    models count theirs too)."""
    text = scrape_sidecars(served.url)
    totals: dict[str, float] = {}
    for member in (*MEMBERS, "digits-pool"):
        loads = total(text, "loom_model_loads_total", model=member)
        if loads:
            totals[member] = loads
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

    expected = rounds * len(MEMBERS)
    deadline = time.monotonic() + 60  # the replica writes its stats every second
    while sum((loads := loads_by_member(served)).values()) < expected and (
        time.monotonic() < deadline
    ):
        time.sleep(0.25)
    assert set(loads) == set(MEMBERS)
    # 3 members round-robin through 2 slots: least recently used is always the next one
    # asked for, so every request after the first two misses: 3 rounds x 3 = 9 loads > 3
    assert sum(loads.values()) > len(MEMBERS)
    assert sum(loads.values()) == rounds * len(MEMBERS)


def test_members_are_listed_described_and_ready_but_the_pool_name_is_not_callable(
    served: Served,
) -> None:
    listed = httpx.get(f"{served.url}/v1/models", timeout=30).json()
    ids = sorted(card["id"] for card in listed["data"])
    assert set(MEMBERS) <= set(ids)
    assert "digits-pool" not in ids
    # each callable name once: the members in place of the pool, beside the other models
    assert ids == sorted(served.served_names)

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
