"""Generation's HTTP side keeps one request's fault to itself. No Ray: the gateway's app over a
real generation replica (a tiny GPT-2) called in-process through a stand-in for its Serve
handle, on one event loop.

- parameters at their edges: temperature 1e-300 is greedy (200), a seed past int64 and every
  other numeric field outside its documented range is a 400 naming the field;
- a sequence whose sampling fails: its stream ends with an error event and ``[DONE]`` (not a
  hang), its non-streamed twin is a 500 in the OpenAI shape, and a request running beside it
  gets the answer it gets alone;
- the engine's loop dies anyway: the stream in flight ends with an error event, new requests
  are 503 with Retry-After, the health check fails, and the replica leaves (Serve replaces it).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from inprocess import LOOPBACK_URL, GenerationHandle, gateway_over
from tiny_replicas import tiny_generation_replica

from models.engines import sampling
from models.engines.generate import SamplingParams
from models.engines.sampling import SEED_MAX, SEED_MIN, SequenceSampler
from serving.config import parse_config
from serving.gateway.app import build_http_app
from serving.replicas.generation import GenerationReplica

MODEL = "tiny-gen-isolation"
PROMPT = "once upon a time"
POISONED_SEED = 4242
"""Tests make sampling raise for the sequence with this seed (as NaN logits would)."""


def make_replica(root: Path, name: str = MODEL) -> GenerationReplica:
    return tiny_generation_replica(root, name, generation={"max_sequences": 4})


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GenerationReplica]:
    replica = make_replica(tmp_path_factory.mktemp("gen-isolation"))
    yield replica
    replica._engine.close()


def gateway(replica: GenerationReplica, name: str = MODEL) -> httpx.AsyncClient:
    config = parse_config({"models": [{"name": name, "source": name, "task": "generate"}]})
    app = build_http_app(gateway_over(config, name, GenerationHandle(replica)))  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=LOOPBACK_URL)


def run(scenario: Callable[[httpx.AsyncClient], Awaitable[Any]], replica: GenerationReplica) -> Any:
    async def main() -> Any:
        async with gateway(replica) as http:
            return await scenario(http)

    return asyncio.run(main())


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, **fields}


def events(body: str) -> list[Any]:
    """The SSE ``data:`` payloads of a stream, ``[DONE]`` kept as the string."""
    payloads = [line[len("data: ") :] for line in body.splitlines() if line.startswith("data: ")]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


@pytest.fixture
def poisoned_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    real = sampling.pick_next_token

    def pick(logits: torch.Tensor, params: SamplingParams, generator: Any) -> int:
        if params.seed == POISONED_SEED:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(logits, params, generator)

    monkeypatch.setattr(sampling, "pick_next_token", pick)


# ---- parameters at their edges --------------------------------------------------------------


def test_a_temperature_of_1e_300_is_greedy(replica: GenerationReplica) -> None:
    async def scenario(http: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await http.post("/v1/completions", json=completion(temperature=0)),
            await http.post("/v1/completions", json=completion(temperature=1e-300, seed=1)),
        ]

    greedy, tiny = run(scenario, replica)
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"] == greedy.json()["choices"]
    replica.check_health()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", 2**70),
        ("seed", SEED_MAX + 1),
        ("seed", SEED_MIN - 1),
        ("temperature", 2.0001),
        ("temperature", -1e-300),
        ("top_p", 0),
        ("top_p", 1.5),
        ("n", 0),
        ("n", 17),
        ("max_tokens", 0),
        ("max_tokens", 2**31),
        ("best_of", 10**30),
        ("logprobs", 21),
        ("logprobs", -1),
        ("max_tokens", -1),
    ],
)
def test_a_numeric_field_outside_its_range_is_a_400_naming_it(
    replica: GenerationReplica, field: str, value: float, stream: bool
) -> None:
    body = completion(stream=stream, **{field: value})

    async def scenario(http: httpx.AsyncClient) -> httpx.Response:
        return await http.post("/v1/completions", json=body)

    reply = run(scenario, replica)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == field
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("field", ["max_completion_tokens", "max_tokens"])
def test_chat_token_limits_have_the_same_range(replica: GenerationReplica, field: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], field: 2**31}

    async def scenario(http: httpx.AsyncClient) -> httpx.Response:
        return await http.post("/v1/chat/completions", json=body)

    reply = run(scenario, replica)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == field


def test_seeds_at_the_int64_bounds_are_served_and_repeatable(replica: GenerationReplica) -> None:
    async def scenario(http: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await http.post("/v1/completions", json=completion(seed=seed, n=2))
            for seed in (SEED_MIN, SEED_MAX, SEED_MAX)  # n=2 wraps SEED_MAX's second sample
        ]

    low, high, high_again = run(scenario, replica)
    assert low.status_code == high.status_code == 200, (low.text, high.text)
    assert high.json()["choices"] == high_again.json()["choices"]


# ---- one sequence fails ------------------------------------------------------------------------


@pytest.mark.usefixtures("poisoned_sampling")
def test_a_failing_sequence_ends_its_stream_with_an_error_event_and_spares_its_neighbour(
    replica: GenerationReplica,
) -> None:
    neighbour = completion(temperature=0, max_tokens=16)

    async def scenario(http: httpx.AsyncClient) -> tuple[httpx.Response, ...]:
        alone = await http.post("/v1/completions", json=neighbour)
        poisoned = completion(stream=True, temperature=0.8, seed=POISONED_SEED, max_tokens=16)
        stream, beside = await asyncio.gather(
            http.post("/v1/completions", json=poisoned),
            http.post("/v1/completions", json=neighbour),
        )
        return alone, stream, beside

    alone, stream, beside = run(scenario, replica)
    assert stream.status_code == 200  # the status went out with the first chunk
    *_, error, done = events(stream.text)
    assert done == "[DONE]"
    assert error["error"]["code"] == "generation_failed"
    assert "sampling failed" in error["error"]["message"]
    assert beside.status_code == 200
    assert beside.json()["choices"] == alone.json()["choices"]
    replica.check_health()


@pytest.mark.usefixtures("poisoned_sampling")
def test_a_failing_sequence_without_a_stream_is_a_500_in_the_openai_shape(
    replica: GenerationReplica,
) -> None:
    async def scenario(http: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await http.post("/v1/completions", json=completion(seed=POISONED_SEED)),
            await http.post("/v1/completions", json=completion(temperature=0)),
        ]

    failed, after = run(scenario, replica)
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert error["code"] == "generation_failed"
    assert error["type"] == "api_error"
    assert after.status_code == 200  # the replica serves on


# ---- the engine's loop dies anyway ------------------------------------------------------------


def test_a_dead_loop_ends_the_stream_refuses_new_calls_and_the_replica_leaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "tiny-gen-dying"
    replica = make_replica(tmp_path, name)
    left = threading.Event()
    replica._leave = left.set
    real_prepare = SequenceSampler.prepare_tensor_args

    def fail_the_step(self: SequenceSampler, requests: list[Any]) -> torch.Tensor:
        if armed.is_set():
            raise RuntimeError("a bug in a step of the batch")
        return real_prepare(self, requests)

    armed = threading.Event()
    monkeypatch.setattr(SequenceSampler, "prepare_tensor_args", fail_the_step)

    async def scenario(http: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        body = {"model": name, "prompt": PROMPT, "max_tokens": 16}
        assert (await http.post("/v1/completions", json=body)).status_code == 200
        armed.set()
        stream = await http.post("/v1/completions", json={**body, "stream": True})
        refused = await http.post("/v1/completions", json=body)
        await asyncio.get_running_loop().run_in_executor(None, left.wait)
        return stream, refused

    try:

        async def main() -> tuple[httpx.Response, httpx.Response]:
            async with gateway(replica, name) as http:
                return await scenario(http)

        stream, refused = asyncio.run(main())
    finally:
        replica._engine.close()

    assert stream.status_code == 200
    *_, error, done = events(stream.text)
    assert done == "[DONE]"
    assert error["error"]["code"] == "replica_unavailable"
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "replica_unavailable"
    with pytest.raises(RuntimeError, match="a bug in a step"):
        replica.check_health()
    assert left.is_set()
