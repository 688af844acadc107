"""Generation through the whole stack on the session Ray: OpenAI routes, SSE streaming with
the OpenAI SDK, continuous batching, cancellation on disconnect, errors and metrics."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from model_folders import make_tiny_gpt2_folder
from serving_stack import GENERATION_CONTEXT as CONTEXT
from serving_stack import SharedStack, Stack
from sidecar_totals import sidecar_total, wait_for_total

from models.store import ModelStore
from serving.monitoring.scrape import scrape_sidecars


@pytest.fixture(scope="module")
def stack(serving_stack: SharedStack) -> Stack:
    """The shared server (``serving_stack.generation_models``): ``tinygpt`` with four slots,
    following its serving alias (at 1), and ``minilm`` as the non-generate model."""
    return serving_stack.running()


@pytest.fixture(scope="module")
def server(stack: Stack) -> str:
    return stack.url


@pytest.fixture(scope="module")
def store(stack: Stack) -> ModelStore:
    return stack.store


@pytest.fixture(scope="module")
def model_dir(store: ModelStore) -> Path:
    """Version 1's folder, as the store holds it."""
    return store.resolve("tinygpt@1").path


def reference_greedy(model_dir: Path, prompt: str, max_tokens: int) -> str:
    """What transformers' own generate() says, decoded the way the server decodes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(
            ids, do_sample=False, max_new_tokens=max_tokens, pad_token_id=tokenizer.eos_token_id
        )[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in out:
        out = out[: out.index(tokenizer.eos_token_id)]
    return tokenizer.decode(out, skip_special_tokens=True)


def metric(server: str, name: str) -> float:
    """A tinygpt series summed over its replicas, from the sidecars."""
    return sidecar_total(server, name, model="tinygpt")


def test_a_greedy_completion_equals_transformers_generate(server: str, model_dir: Path) -> None:
    body = {"model": "tinygpt", "prompt": "once upon a time", "max_tokens": 24, "temperature": 0}
    reply = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] == reference_greedy(model_dir, "once upon a time", 24)
    usage = data["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_the_openai_sdk_parses_streamed_completion_chunks(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    whole = client.completions.create(
        model="tinygpt",
        prompt="the lazy",
        max_tokens=20,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    chunks = list(
        client.completions.create(
            model="tinygpt",
            prompt="the lazy",
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["length"]  # 20 tokens, EOS ignored
    assert chunks[-1].usage.completion_tokens == 20
    assert whole.usage.completion_tokens == 20


def test_the_openai_sdk_streams_a_chat_completion(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(
        model="tinygpt", messages=messages, max_tokens=12, temperature=0, seed=1
    )
    stream = client.chat.completions.create(
        model="tinygpt", messages=messages, max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_n_choices_and_several_prompts_come_back_indexed(server: str) -> None:
    body = {
        "model": "tinygpt",
        "prompt": ["the quick", "a model"],
        "n": 2,
        "max_tokens": 6,
        "temperature": 1.0,
        "seed": 5,
        "ignore_eos": True,
    }
    data = httpx.post(f"{server}/v1/completions", json=body, timeout=60).json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    assert data["usage"]["completion_tokens"] == 4 * 6
    again = httpx.post(f"{server}/v1/completions", json=body, timeout=60).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in data["choices"]]  # seeded


async def stream_lines(
    client: httpx.AsyncClient, body: dict, on_first: asyncio.Event | None = None
):
    """The SSE data payloads of one streamed completion, and the time it ended."""
    payloads = []
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        assert reply.status_code == 200
        async for line in reply.aiter_lines():
            if line.startswith("data: "):
                payloads.append(line[6:])
                if on_first is not None:
                    on_first.set()
    return payloads, time.monotonic()


def test_a_request_joining_a_running_batch_finishes_before_the_long_one(server: str) -> None:
    long_body = {"model": "tinygpt", "prompt": "the quick", "max_tokens": 600, "stream": True,
                 "temperature": 0, "ignore_eos": True}  # fmt: skip
    short_body = {"model": "tinygpt", "prompt": "once", "max_tokens": 5, "stream": True,
                  "temperature": 0, "ignore_eos": True}  # fmt: skip

    async def run() -> tuple[float, float, list[str]]:
        async with httpx.AsyncClient(base_url=server, timeout=120) as client:
            started = asyncio.Event()
            long_task = asyncio.create_task(stream_lines(client, long_body, started))
            await started.wait()  # the long one is decoding
            short_payloads, short_end = await stream_lines(client, short_body)
            long_payloads, long_end = await long_task
            assert long_payloads[-1] == "[DONE]"
            return short_end, long_end, short_payloads

    short_end, long_end, short_payloads = asyncio.run(run())
    assert short_end < long_end
    assert short_payloads[-1] == "[DONE]"
    finish = [json.loads(p)["choices"][0]["finish_reason"] for p in short_payloads[:-1]]
    assert finish[-1] == "length"


def test_a_client_that_disconnects_frees_its_slots(server: str) -> None:
    """Four long streams fill the replica's four slots; their clients hang up after the first
    chunk. The sequences stop there: far fewer tokens than 4 x 1000 are generated, the running
    gauge drops to 0, and a new request gets a slot."""
    tokens_before = metric(server, "loom_generated_tokens_total")
    calls_before = metric(server, "loom_replica_request_duration_seconds_count")
    body = {"model": "tinygpt", "prompt": "the quick", "max_tokens": 1000, "stream": True,
            "temperature": 0, "ignore_eos": True}  # fmt: skip

    async def hang_up_after_first_chunk() -> None:
        async with (
            httpx.AsyncClient(base_url=server, timeout=60) as client,
            client.stream("POST", "/v1/completions", json=body) as reply,
        ):
            async for line in reply.aiter_lines():
                if line.startswith("data: "):
                    return  # leaving the block closes the connection

    async def run() -> None:
        await asyncio.gather(*[hang_up_after_first_chunk() for _ in range(4)])

    asyncio.run(run())
    deadline = time.monotonic() + 30
    while metric(server, "loom_running_sequences") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "loom_running_sequences") == 0
    reply = httpx.post(
        f"{server}/v1/completions",
        json={"model": "tinygpt", "prompt": "once", "max_tokens": 3, "ignore_eos": True},
        timeout=60,
    )
    assert reply.json()["usage"]["completion_tokens"] == 3
    # read once the replica's stats hold all 5 calls' ends (it rewrites them every second)
    wait_for_total(
        server,
        "loom_replica_request_duration_seconds_count",
        lambda calls: calls >= calls_before + 5,
        model="tinygpt",
    )
    generated = metric(server, "loom_generated_tokens_total") - tokens_before
    assert generated < 4 * 1000 / 2, f"{generated} tokens: the cancelled sequences ran on"


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/completions", {"prompt": ""}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": CONTEXT}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, "temperature"),
        ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p"),
        ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": [[1, 10**9]]}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": CONTEXT},
            "max_tokens",
        ),
    ],
)
def test_bad_generation_requests_get_400_in_openai_shape(
    server: str, route: str, body: dict, param: str | None
) -> None:
    for stream in (False, True):
        reply = httpx.post(f"{server}{route}", json={"model": "tinygpt", "stream": stream, **body})
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error"
        if param is not None:
            assert error["param"].startswith(param), error


def test_unknown_model_is_404_and_a_non_generate_model_is_400(server: str) -> None:
    reply = httpx.post(f"{server}/v1/completions", json={"model": "nope", "prompt": "hi"})
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "model_not_found"
    chat = {"model": "minilm", "messages": [{"role": "user", "content": "hi"}]}
    reply = httpx.post(f"{server}/v1/chat/completions", json=chat)
    assert reply.status_code == 400
    assert "embed model" in reply.json()["error"]["message"]
    reply = httpx.post(f"{server}/v1/embeddings", json={"model": "tinygpt", "input": "hi"})
    assert reply.status_code == 400
    assert "/v1/completions" in reply.json()["error"]["message"]


def test_generation_metrics_are_exported(server: str) -> None:
    httpx.post(
        f"{server}/v1/completions",
        json={"model": "tinygpt", "prompt": "the", "max_tokens": 4, "ignore_eos": True},
        timeout=60,
    )
    # the sidecar exports them once the replica has written its stats (every second)
    assert wait_for_total(server, "loom_generated_tokens_total", lambda n: n >= 4, model="tinygpt")
    text = scrape_sidecars(server)
    for name in (
        "loom_time_to_first_token_seconds_count",
        "loom_inter_token_latency_seconds_count",
        "loom_running_sequences",
        "loom_waiting_sequences",
        "loom_kv_cache_use_ratio",
        "loom_queue_depth_seconds_total",
    ):
        assert re.search(rf'^{name}{{[^}}]*model="tinygpt"', text, re.M), name


def test_promoting_a_new_version_under_streaming_load_fails_no_request(
    server: str, store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Long streams on version 1 run to their end while the alias moves to version 2; short
    requests keep flowing throughout, none fails, and the later ones come from version 2."""
    v2 = make_tiny_gpt2_folder(tmp_path_factory.mktemp("tinygpt-v2"), n_positions=CONTEXT, seed=1)
    store.register("tinygpt", v2, task="generate", version="2")
    long_body = {"model": "tinygpt", "prompt": "the quick", "max_tokens": 400, "stream": True,
                 "temperature": 0, "ignore_eos": True}  # fmt: skip
    short_body = {"model": "tinygpt", "prompt": "once", "max_tokens": 4, "ignore_eos": True}

    async def long_stream(client: httpx.AsyncClient, started: asyncio.Event) -> tuple[str, int]:
        async with client.stream("POST", "/v1/completions", json=long_body) as reply:
            version, finish = reply.headers["x-loom-model-version"], None
            async for line in reply.aiter_lines():
                if line.startswith("data: {"):
                    started.set()
                    choices = json.loads(line[6:])["choices"]
                    finish = finish or (choices and choices[0]["finish_reason"])
            return version, (reply.status_code, finish)

    async def run() -> tuple[list, list]:
        async with httpx.AsyncClient(base_url=server, timeout=120) as client:
            started = [asyncio.Event() for _ in range(2)]
            longs = [asyncio.create_task(long_stream(client, e)) for e in started]
            for event in started:
                await event.wait()  # both decoding on version 1
            promoted = await client.post("/v1/admin/models/tinygpt/promote", json={"version": "2"})
            assert promoted.status_code == 200, promoted.text
            assert promoted.json()["previous"] == "1"  # the alias moved, not a new latest
            shorts = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                reply = await client.post("/v1/completions", json=short_body)
                shorts.append((reply.status_code, reply.headers.get("x-loom-model-version")))
                if shorts[-1][1] == "2" and len([s for s in shorts if s[1] == "2"]) >= 5:
                    break
            return [await t for t in longs], shorts

    longs, shorts = asyncio.run(run())
    assert longs == [("1", (200, "length"))] * 2  # finished on the old version, in full
    assert all(status == 200 for status, _ in shorts), shorts
    assert shorts[-1][1] == "2"


# ---- isolation inside a batch (issue 12) ------------------------------------------------------


def test_a_temperature_of_1e_300_is_a_greedy_answer(server: str) -> None:
    """It used to divide the logits to inf/NaN, and torch.multinomial's error ended the
    replica's generation loop for every sequence on it. Compared with the server's own greedy
    answer (an earlier test may have promoted version 2)."""
    body = {"model": "tinygpt", "prompt": "once upon a time", "max_tokens": 12}
    greedy = httpx.post(f"{server}/v1/completions", json={**body, "temperature": 0}, timeout=60)
    body |= {"temperature": 1e-300, "seed": 3}
    reply = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-loom-model-version"] == greedy.headers["x-loom-model-version"]
    expected = greedy.json()["choices"][0]["text"]
    assert reply.json()["choices"][0]["text"] == expected
    with httpx.stream("POST", f"{server}/v1/completions", json={**body, "stream": True}) as s:
        assert s.status_code == 200
        text = "".join(
            json.loads(line[6:])["choices"][0]["text"]
            for line in s.iter_lines()
            if line.startswith("data: {") and json.loads(line[6:])["choices"]
        )
    assert text == expected


def test_a_seed_past_int64_is_a_400_naming_it(server: str) -> None:
    for stream in (False, True):
        body = {"model": "tinygpt", "prompt": "hi", "seed": 2**70, "stream": stream}
        reply = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["param"] == "seed"


def _replica_actors(app: str) -> set[str]:
    """The names of the Serve replica actors of ``app``'s model deployment."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#model-tinygpt#"
    named = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"] for a in named if a["name"].startswith(prefix)}


def test_a_replica_whose_generation_loop_dies_ends_its_stream_and_is_replaced(
    server: str,
) -> None:
    """The in-flight stream ends with an error event (not a hang), the replica leaves, and
    Serve starts another that serves the next requests."""
    import ray

    def break_the_generation_loop(replica_actor: object) -> None:
        """Run inside the replica (``__ray_call__``; nested, so it travels by value): the
        next step of its generation loop raises, as a bug in transformers' batch would. A
        new replica (a new process) is unharmed."""
        from models.engines.sampling import SequenceSampler

        def fail(self: object, requests: object) -> object:
            raise RuntimeError("injected by a test: a step of the batch failed")

        SequenceSampler.prepare_tensor_args = fail  # type: ignore[method-assign]

    probe = httpx.post(f"{server}/v1/completions", json={"model": "tinygpt", "prompt": "hi"})
    app = f"loom.tinygpt@{probe.headers['x-loom-model-version']}"
    (old,) = _replica_actors(app)
    body = {"model": "tinygpt", "prompt": "the quick", "max_tokens": 1000, "stream": True,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    events: list[str] = []
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=120) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        for line in lines:
            if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                break  # decoding: now its loop dies under it
        actor = ray.get_actor(old, namespace="serve")
        ray.get(actor.__ray_call__.remote(break_the_generation_loop))
        events = [line[6:] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "replica_unavailable", error
    assert error["message"].startswith("model tinygpt: this replica stopped serving")
    assert "a step of the batch failed" in error["message"]

    statuses = set()
    for _ in range(600):  # Serve replaces it within a health check or two; wait for that
        reply = httpx.post(
            f"{server}/v1/completions", json={"model": "tinygpt", "prompt": "hi"}, timeout=120
        )  # with no replica yet, Serve holds a request until the new one is up
        if reply.status_code == 503:  # said by the leaving replica, in its own words
            refused = reply.json()["error"]
            assert refused["code"] == "replica_unavailable", refused
            assert refused["message"].startswith("model tinygpt: this replica stopped"), refused
        statuses.add(reply.status_code)
        if reply.status_code == 200 and _replica_actors(app) - {old}:
            break
        time.sleep(0.5)
    assert reply.status_code == 200, reply.text
    assert old not in _replica_actors(app)  # the broken replica left
    assert statuses <= {200, 503}, statuses  # refused while it went, never a 500
