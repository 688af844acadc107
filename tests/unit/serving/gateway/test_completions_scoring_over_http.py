"""Scoring over OpenAI's API: ``logprobs``, ``echo``, ``max_tokens: 0`` and token-array
prompts on ``/v1/completions``, ``logprobs`` / ``top_logprobs`` on chat. No Ray: the gateway's
app over a real generation replica (a tiny GPT-2) called in-process, the OpenAI SDK as client.

The served numbers are checked against ``log_softmax`` of transformers' own forward over the
same tokens (within 1e-4), the way lm-evaluation-harness's ``local-completions`` reads them:
``choices[i].logprobs.token_logprobs[ctxlen:]`` of an echoed prompt.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import torch
from inprocess import LOOPBACK_URL, GenerationHandle, gateway_over
from tiny_replicas import tiny_generation_replica

from serving.config import parse_config
from serving.gateway.app import build_http_app
from serving.replicas.generation import GenerationReplica

MODEL = "tiny-scoring"
PROMPT = "once upon a time there was"
USER = [{"role": "user", "content": "x"}]


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GenerationReplica]:
    replica = tiny_generation_replica(
        tmp_path_factory.mktemp("scoring"), MODEL, generation={"max_sequences": 4}
    )
    yield replica
    replica._engine.close()


@pytest.fixture(scope="module")
def reference(replica: GenerationReplica) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        replica._engine.model_dir, use_safetensors=True
    ).eval()


def app_transport(replica: GenerationReplica) -> httpx.ASGITransport:
    config = parse_config({"models": [{"name": MODEL, "source": MODEL, "task": "generate"}]})
    app = build_http_app(gateway_over(config, MODEL, GenerationHandle(replica)))  # type: ignore[arg-type]
    return httpx.ASGITransport(app=app)


def run(scenario: Callable[[openai.AsyncOpenAI, httpx.AsyncClient], Awaitable[Any]],
        replica: GenerationReplica) -> Any:  # fmt: skip
    async def main() -> Any:
        transport = app_transport(replica)
        async with httpx.AsyncClient(transport=transport, base_url=LOOPBACK_URL) as http:
            sdk = openai.AsyncOpenAI(
                api_key="unused", base_url=f"{LOOPBACK_URL}/v1", http_client=http, max_retries=0
            )
            return await scenario(sdk, http)

    return asyncio.run(main())


def log_softmax(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def ids_of(replica: GenerationReplica, text: str) -> list[int]:
    return list(replica._engine.tokenizer(text)["input_ids"])


def test_an_echoed_token_prompt_scored_with_max_tokens_0_equals_log_softmax(
    replica: GenerationReplica, reference: torch.nn.Module
) -> None:
    prompts = [ids_of(replica, PROMPT), ids_of(replica, "the lazy dog")]

    async def scenario(sdk: openai.AsyncOpenAI, _: httpx.AsyncClient) -> Any:
        return await sdk.completions.create(
            model=MODEL, prompt=prompts, echo=True, logprobs=2, max_tokens=0, temperature=0
        )

    answer = run(scenario, replica)
    assert answer.usage.completion_tokens == 0
    for choice, ids in zip(sorted(answer.choices, key=lambda c: c.index), prompts, strict=True):
        assert choice.text == replica._engine.tokenizer.decode(ids)
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(ids)
        assert logprobs.token_logprobs[0] is None
        assert logprobs.top_logprobs[0] is None
        assert "".join(logprobs.tokens) == choice.text
        assert logprobs.text_offset == [
            sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(ids))
        ]
        want = log_softmax(reference, ids)
        for position in range(1, len(ids)):
            served = logprobs.token_logprobs[position]
            assert served == pytest.approx(want[position - 1, ids[position]].item(), abs=1e-4)
            top = logprobs.top_logprobs[position]
            # the 2 best, and the prompt's own token when it is not among them
            assert 2 <= len(top) <= 3
            assert logprobs.tokens[position] in top
            assert max(top.values()) == pytest.approx(want[position - 1].max().item(), abs=1e-4)


def test_echo_with_generation_puts_the_prompt_first_and_its_greedy_tokens_are_the_max(
    replica: GenerationReplica, reference: torch.nn.Module
) -> None:
    async def scenario(sdk: openai.AsyncOpenAI, _: httpx.AsyncClient) -> Any:
        plain = await sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5,
                                             temperature=0)  # fmt: skip
        scored = await sdk.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, echo=True, logprobs=3
        )
        return plain, scored

    plain, scored = run(scenario, replica)
    assert plain.choices[0].logprobs is None  # nobody asked
    (choice,) = scored.choices
    assert choice.text == PROMPT + plain.choices[0].text
    prompt_ids = ids_of(replica, PROMPT)
    generated = choice.logprobs.token_logprobs[len(prompt_ids) :]
    assert len(generated) == scored.usage.completion_tokens
    for logprob, top in zip(generated, choice.logprobs.top_logprobs[len(prompt_ids) :],
                            strict=True):  # fmt: skip
        assert logprob == pytest.approx(max(top.values()), abs=1e-6)  # temperature 0


def test_a_chat_answer_has_logprobs_in_the_chat_shape(replica: GenerationReplica) -> None:
    async def scenario(sdk: openai.AsyncOpenAI, _: httpx.AsyncClient) -> Any:
        messages = [{"role": "user", "content": "hi"}]
        return await sdk.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=4,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
        )

    answer = run(scenario, replica)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_streamed_logprobs_cover_each_generated_token_once(replica: GenerationReplica) -> None:
    async def scenario(_: openai.AsyncOpenAI, http: httpx.AsyncClient) -> Any:
        body = {
            "model": MODEL,
            "prompt": PROMPT,
            "max_tokens": 8,
            "temperature": 0,
            "logprobs": 1,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        whole = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        streamed = await http.post("/v1/completions", json=body)
        return streamed, await http.post("/v1/completions", json=whole)

    streamed, whole = run(scenario, replica)
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: {")]  # fmt: skip
    tokens = [t for c in chunks for choice in c["choices"] if choice["logprobs"]
              for t in choice["logprobs"]["token_logprobs"]]  # fmt: skip
    expected = whole.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert tokens == pytest.approx(expected, abs=1e-6)
    assert len(tokens) == chunks[-1]["usage"]["completion_tokens"]


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": PROMPT, "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": [[]]}, "prompt"),
        ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
        ("/v1/completions", {"prompt": [[1, -2]]}, "prompt"),
        ("/v1/completions", {"prompt": [True, 2]}, "prompt"),
        ("/v1/completions", {"prompt": [[5, 10**9]], "echo": True, "max_tokens": 0}, "prompt"),
        ("/v1/completions", {"prompt": PROMPT, "suffix": "x"}, "suffix"),
        ("/v1/chat/completions", {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
        (
            "/v1/chat/completions",
            {"messages": USER, "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
    ],
)
def test_bad_scoring_requests_are_400_naming_the_field(
    replica: GenerationReplica, route: str, body: dict[str, Any], param: str
) -> None:
    async def scenario(_: openai.AsyncOpenAI, http: httpx.AsyncClient) -> httpx.Response:
        return await http.post(route, json={"model": MODEL, **body})

    reply = run(scenario, replica)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"].startswith(param), error
    replica.check_health()
