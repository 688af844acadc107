"""Sharded services through the real gateway on the session's Ray: a pool of digits variants
over shards keyed by model name (each shard loads only the members its ring gives it), a model
sharded by the X-Loom-Shard-Key header, and resharding 2 -> 3 under load with no request
failing."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from ray import serve
from serving_stack import MEMBERS, SESSIONS, SHARDED_POOL

from models.engines import build_engine
from models.store import ModelStore
from serving.routing.ring import build_ring, place, shard_ids


@dataclass
class Served:
    url: str
    store: ModelStore


@pytest.fixture(scope="module")
def served(serving_stack) -> Served:
    stack = serving_stack.running()
    return Served(stack.url, stack.store)


def rows(seed: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 16, size=(n, 64)).astype(np.float32)


def infer(client: httpx.Client, url: str, name: str, x: np.ndarray, **headers: str):
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                        "data": x.ravel().tolist()}]}  # fmt: skip
    return client.post(f"{url}/v2/models/{name}/infer", json=body, headers=headers, timeout=30)


def probabilities(response: httpx.Response) -> np.ndarray:
    out = response.json()["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def shard_map(client: httpx.Client, url: str, model: str, **params: str) -> dict:
    response = client.get(f"{url}/v1/admin/shards", params=params)
    assert response.status_code == 200, response.text
    return next(entry for entry in response.json()["data"] if entry["model"] == model)


def loaded_on(shard: str) -> list[str]:
    """What the replica of shard ``shard`` of the pool holds now (its pool info)."""
    handle = serve.get_app_handle(f"loom.{SHARDED_POOL}~{shard}@pool")
    return handle.info.remote().result(timeout_s=30)["loaded"]


def test_each_member_answers_with_its_own_weights_and_each_shard_loads_only_its_own(
    served: Served,
) -> None:
    x = rows(1)
    with httpx.Client() as client:
        for name in MEMBERS:
            response = infer(client, served.url, name, x)
            assert response.status_code == 200, response.text
            engine = build_engine("classify", served.store.resolve(name).path, device="cpu")
            engine.load()
            np.testing.assert_allclose(probabilities(response), engine.run(x), atol=1e-5)
        placed = shard_map(client, served.url, SHARDED_POOL)
    ring = build_ring(shard_ids(2))
    expected = {k: sorted(n for n in MEMBERS if place(ring, n) == k) for k in ("0", "1")}
    assert {k: sorted(v["keys"]) for k, v in placed["shards"].items()} == expected
    for shard, names in expected.items():
        # 8 members over 2 shards: each replica loaded only the members its ring sent it
        assert loaded_on(shard) == names


def shard_requests(client: httpx.Client, url: str, model: str) -> dict[str, float]:
    """``loom_shard_requests_total`` of ``model``, by shard, from ``/metrics``."""
    text = client.get(f"{url}/metrics").text
    pattern = rf'^loom_shard_requests_total\{{model="{model}",shard="(\d+)"\}} (\S+)$'
    return {shard: float(value) for shard, value in re.findall(pattern, text, re.M)}


def test_a_header_sharded_model_answers_with_and_without_a_shard_key(served: Served) -> None:
    x = rows(2)
    with httpx.Client() as client:
        before = shard_requests(client, served.url, SESSIONS)
        keyed = [infer(client, served.url, SESSIONS, x, **{"X-Loom-Shard-Key": f"user-{i}"})
                 for i in range(6)]  # fmt: skip
        keyless = [infer(client, served.url, SESSIONS, x) for _ in range(4)]
        placed = shard_map(client, served.url, SESSIONS, key="user-1")
        after = shard_requests(client, served.url, SESSIONS)
    assert [r.status_code for r in keyed + keyless] == [200] * 10
    first = probabilities(keyed[0])
    for response in keyed + keyless:  # two shards of one model: the same answer from either
        np.testing.assert_allclose(probabilities(response), first, atol=1e-6)
    assert placed["key"] == "header"
    assert placed["placed"] == {"key": "user-1", "shard": place(build_ring(("0", "1")), "user-1")}
    # the metric counts each request on its shard: the keyed ones where the ring puts their
    # key, the keyless ones where it puts their request id; 10 in all
    counted = {shard: after.get(shard, 0.0) - before.get(shard, 0.0) for shard in ("0", "1")}
    assert sum(counted.values()) == 10
    for shard in ("0", "1"):
        keyed_here = sum(place(build_ring(("0", "1")), f"user-{i}") == shard for i in range(6))
        assert keyed_here <= counted[shard] <= keyed_here + 4


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/admin/shards/no-such-model", {"shards": 3}, 404, "model_not_found"),
        ("/v1/admin/shards/digits", {"shards": 3}, 409, "not_sharded"),
        (f"/v1/admin/shards/{SHARDED_POOL}", {"shards": 0}, 400, None),
        (f"/v1/admin/shards/{SHARDED_POOL}", {"shards": 65}, 400, None),
        (f"/v1/admin/shards/{SHARDED_POOL}", {"count": 3}, 400, None),
    ],
)
def test_a_bad_reshard_request_is_refused_in_openai_shape(
    served: Served, path: str, body: dict, status: int, code: str | None
) -> None:
    response = httpx.post(served.url + path, json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    if code is not None:
        assert error["code"] == code


def test_resharding_2_to_3_under_load_fails_no_request_and_moves_keys_only_to_the_new_shard(
    served: Served,
) -> None:
    before = build_ring(shard_ids(2))
    after = build_ring(shard_ids(3))
    moved = [n for n in MEMBERS if place(before, n) != place(after, n)]
    assert moved  # 8 members over the ring: it moves some, and only to the new shard
    assert {place(after, n) for n in moved} == {"2"}

    statuses: Counter[int] = Counter()
    errors: list[str] = []
    stop = threading.Event()
    x = rows(3, n=2)

    def load(offset: int) -> None:
        with httpx.Client() as client:
            i = offset
            while not stop.is_set():
                name = MEMBERS[i % len(MEMBERS)]
                i += 1
                try:
                    response = infer(client, served.url, name, x)
                    statuses[response.status_code] += 1
                    if response.status_code != 200:
                        errors.append(f"{name}: {response.status_code} {response.text[:200]}")
                except httpx.HTTPError as exc:
                    statuses[0] += 1
                    errors.append(f"{name}: {exc!r}")

    threads = [threading.Thread(target=load, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        with httpx.Client() as client:
            response = client.post(
                f"{served.url}/v1/admin/shards/{SHARDED_POOL}", json={"shards": 3}, timeout=30
            )
            assert response.status_code == 202, response.text
            assert response.json() == {"model": SHARDED_POOL, "shards": 3, "previous": 2}
            deadline = time.monotonic() + 180
            while shard_map(client, served.url, SHARDED_POOL)["routed_shards"] < 3:
                assert time.monotonic() < deadline, "the third shard was not routed in 180 s"
                time.sleep(0.5)
            served_before = sum(statuses.values())
            time.sleep(2.0)  # traffic on the new ring
            placed = shard_map(client, served.url, SHARDED_POOL)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert errors == [], errors[:5]
    assert statuses[200] > 50
    assert sum(statuses.values()) > served_before  # the load ran on after the ring moved
    assert placed["requested_shards"] == 3
    assert sorted(placed["shards"]["2"]["keys"]) == sorted(moved)
    assert loaded_on("2") == sorted(moved)  # the new shard holds what moved to it, nothing else
