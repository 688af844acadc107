"""The stack on one local Ray: two replicas, batching under concurrency, admission."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from serving_stack import SharedStack
from sidecar_totals import sidecar_total, wait_for_total


@pytest.fixture(scope="module")
def server(serving_stack: SharedStack) -> str:
    """The shared server (``serving_stack.embedding_models``): ``minilm`` on two replicas,
    ``tight`` with a queue of 2; through Serve's proxy (e2e covers direct ingress)."""
    return serving_stack.running().url


def test_two_replicas_answer_64_concurrent_requests_and_batch_them(server: str) -> None:
    texts = [f"sentence number {i} about serving models" for i in range(64)]

    async def fire() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server, timeout=60, limits=limits) as client:
            return await asyncio.gather(
                *[
                    client.post("/v1/embeddings", json={"model": "minilm", "input": t})
                    for t in texts
                ]
            )

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * 64
    vectors = [r.json()["data"][0]["embedding"] for r in responses]
    assert all(len(v) == 384 for v in vectors)

    status = httpx.get(f"{server}/v1/status").json()
    assert status["deployments"]["model-minilm"]["running_replicas"] == 2

    # the replicas' counts, through the sidecar (each replica writes its stats every second)
    served = wait_for_total(server, "loom_inputs_total", lambda n: n >= 64, model="minilm")
    assert served >= 64
    count = sidecar_total(server, "loom_batch_size_count", model="minilm")
    singles = sidecar_total(server, "loom_batch_size_bucket", model="minilm", le="1.0")
    # 64 inputs in fewer engine runs than inputs means some batch held more than one
    assert count - singles >= 1, f"no batch larger than 1: {count} batches, {singles} of size 1"


def test_a_request_larger_than_the_queue_is_refused_with_503_and_retry_after(server: str) -> None:
    response = httpx.post(
        f"{server}/v1/embeddings", json={"model": "tight", "input": ["a", "b", "c"]}, timeout=30
    )
    assert response.status_code == 503  # 3 inputs > max_queued 2
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "overloaded"
    # within the limit it is served
    ok = httpx.post(
        f"{server}/v1/embeddings", json={"model": "tight", "input": ["a", "b"]}, timeout=30
    )
    assert ok.status_code == 200


def test_same_text_gives_the_same_vector_from_either_replica(server: str) -> None:
    body = {"model": "minilm", "input": "replicas agree"}
    first = httpx.post(f"{server}/v1/embeddings", json=body, timeout=30).json()["data"][0][
        "embedding"
    ]
    for _ in range(6):
        again = httpx.post(f"{server}/v1/embeddings", json=body, timeout=30).json()
        assert again["data"][0]["embedding"] == pytest.approx(first, abs=1e-5)
