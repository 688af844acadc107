"""Rollout on one local Ray: a promotion under concurrent load fails no request and moves the
answers to the new version without restarting the gateway; a canary split serves both
versions by weight. Version 2 of ``rollout-minilm`` is the bundled files registered again."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import pytest
import ray
from ray import serve
from serving_stack import ROLLOUT_MODEL, SharedStack

from serving.server import LoomServer

VERSION = "x-loom-model-version"


@dataclass
class Running:
    url: str
    loom: LoomServer


@pytest.fixture(scope="module")
def running(serving_stack: SharedStack) -> Running:
    """The shared server (``serving_stack.rollout_models``): ``rollout-minilm`` follows its
    store model's serving alias (at 1; version 2 is the same files), ``canary`` splits 50/50
    between the two versions. No other module serves that store model."""
    stack = serving_stack.running()
    return Running(stack.url, stack.loom)


def test_a_canary_split_serves_both_versions_by_weight(running: Running) -> None:
    versions = Counter()
    for i in range(40):
        response = httpx.post(
            f"{running.url}/v1/embeddings",
            json={"model": "canary", "input": f"canary {i}"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        versions[response.headers[VERSION]] += 1
    # 50/50 over 40 requests: each side gets 20 on average; fewer than 8 has p < 1e-4
    assert versions["1"] >= 8, versions
    assert versions["2"] >= 8, versions

    status = httpx.get(f"{running.url}/v1/status", timeout=10).json()
    canary = status["deployments"]["model-canary"]
    assert canary["ready"] is True
    assert {v: e["weight"] for v, e in canary["versions"].items()} == {"1": 50.0, "2": 50.0}


@dataclass
class Answer:
    started_s: float
    status: int
    version: str | None


def load(url: str, stop: threading.Event, answers: list[Answer], workers: int = 8) -> None:
    """``workers`` clients in a closed loop, each request one short sentence, until ``stop``."""

    async def worker(client: httpx.AsyncClient, n: int) -> None:
        i = 0
        while not stop.is_set():
            started = time.monotonic()
            body = {"model": ROLLOUT_MODEL, "input": f"client {n} request {i} during a rollout"}
            try:
                response = await client.post("/v1/embeddings", json=body)
                answers.append(Answer(started, response.status_code, response.headers.get(VERSION)))
            except httpx.HTTPError as exc:  # a dropped connection is a failed request too
                answers.append(Answer(started, 0, repr(exc)))
            i += 1

    async def main() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            await asyncio.gather(*(worker(client, n) for n in range(workers)))

    asyncio.run(main())


def test_promotion_under_load_fails_no_request_and_answers_move_to_the_new_version(
    running: Running,
) -> None:
    board = running.loom._board
    gateways_before = set(ray.get(board.reports.remote()))
    assert len(gateways_before) == 1

    answers: list[Answer] = []
    stop = threading.Event()
    clients = threading.Thread(target=load, args=(running.url, stop, answers))
    clients.start()
    try:
        time.sleep(2)  # traffic on version 1 first
        promoted = httpx.post(
            f"{running.url}/v1/admin/models/{ROLLOUT_MODEL}/promote",
            json={"version": "2"},
            timeout=10,
        )
        assert promoted.status_code == 200, promoted.text
        assert promoted.json()["previous"] == "1"
        deadline = time.monotonic() + 60
        while not any(a.version == "2" for a in answers) and time.monotonic() < deadline:
            time.sleep(0.2)
        switched_s = time.monotonic()
        time.sleep(3)  # keep the load on while version 1 drains
    finally:
        stop.set()
        clients.join(60)

    failed = [a for a in answers if a.status != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:3]}"
    by_version = Counter(a.version for a in answers)
    assert by_version["1"] > 0, by_version
    assert by_version["2"] > 0, by_version
    # once version 2 has answered, every request started a second later is version 2's
    late = [a.version for a in answers if a.started_s > switched_s + 1.0]
    assert late, "no requests after the switch"
    assert set(late) == {"2"}

    deadline = time.monotonic() + 30  # version 1's app drains, then goes
    old, new = f"loom.{ROLLOUT_MODEL}@1", f"loom.{ROLLOUT_MODEL}@2"
    while old in serve.status().applications and time.monotonic() < deadline:
        time.sleep(0.5)
    assert old not in serve.status().applications
    assert new in serve.status().applications

    reports = ray.get(board.reports.remote())  # the same gateway replica, still polling
    assert set(reports) == gateways_before
    assert all(r.age_s < 5 for r in reports.values())
    ready = httpx.get(f"{running.url}/v2/health/ready", timeout=10)
    assert ready.status_code == 200
