"""Generation through `loom serve` as users run it: the gateway's own HTTP server (direct
ingress, the default) streaming SSE, the OpenAI SDK, and a client that hangs up."""

from __future__ import annotations

import time

import httpx
import pytest
from loom_process import ADMIN_KEY, API_KEY, LoomProcess
from openai import OpenAI
from sidecar_totals import sidecar_total

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def gen_server(keyed_server: LoomProcess) -> LoomProcess:
    """The keyed session server (conftest): ``tinygpt`` with two sequence slots, no stream
    interval; requests carry the key."""
    return keyed_server


def metric(url: str, name: str) -> float:
    """A tinygpt series summed over its replicas, from the sidecars (an admin key lists them)."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    return sidecar_total(url, name, headers=admin, model="tinygpt")


def running_sequences(url: str) -> float:
    return metric(url, "loom_running_sequences")


def test_the_sdk_streams_a_chat_completion_over_the_default_ingress(gen_server) -> None:
    client = OpenAI(base_url=f"{gen_server.url}/v1", api_key=API_KEY, max_retries=0)
    messages = [{"role": "user", "content": "tell me about the fox"}]
    whole = client.chat.completions.create(
        model="tinygpt", messages=messages, max_tokens=16, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(
        client.chat.completions.create(
            model="tinygpt",
            messages=messages,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )  # fmt: skip
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 16


def test_hanging_up_mid_stream_frees_both_slots(gen_server) -> None:
    """Two 1000-token streams take both slots; their clients leave after the first event.
    The sequences stop (far fewer than 2 x 1000 tokens are made) and their slots come free,
    so a third request is answered in full."""
    tokens_before = metric(gen_server.url, "loom_generated_tokens_total")
    calls_before = metric(gen_server.url, "loom_replica_request_duration_seconds_count")
    body = {"model": "tinygpt", "prompt": "the quick", "max_tokens": 1000, "stream": True,
            "ignore_eos": True}  # fmt: skip
    for _ in range(2):
        with httpx.stream(
            "POST", f"{gen_server.url}/v1/completions", json=body, headers=AUTH
        ) as reply:
            assert reply.status_code == 200
            next(reply.iter_lines())
    deadline = time.monotonic() + 30
    while running_sequences(gen_server.url) > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running_sequences(gen_server.url) == 0
    reply = httpx.post(
        f"{gen_server.url}/v1/completions",
        json={"model": "tinygpt", "prompt": "once", "max_tokens": 4, "ignore_eos": True},
        headers=AUTH,
        timeout=60,
    )
    assert reply.json()["usage"]["completion_tokens"] == 4
    # the replica's stats are read once they hold all 3 calls' ends (rewritten every second)
    deadline = time.monotonic() + 60
    while (
        metric(gen_server.url, "loom_replica_request_duration_seconds_count") < calls_before + 3
        and time.monotonic() < deadline
    ):
        time.sleep(0.25)
    generated = metric(gen_server.url, "loom_generated_tokens_total") - tokens_before
    assert generated < 1000, f"{generated} tokens: the abandoned streams ran on"


def test_the_sdk_scores_an_echoed_prompt_as_transformers_log_softmax(gen_server, tmp_path) -> None:
    """lm-evaluation-harness's request: token ids, ``echo``, ``logprobs``, ``max_tokens: 0``;
    the served prompt logprobs equal the reference forward's log-softmax within 1e-4. The
    reference is the same seeded tiny GPT-2 the session server registered (conftest)."""
    import torch
    from model_folders import make_tiny_gpt2_folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_tiny_gpt2_folder(tmp_path / "tinygpt", n_positions=1024)
    ids = AutoTokenizer.from_pretrained(folder)("the quick brown fox jumps")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    client = OpenAI(base_url=f"{gen_server.url}/v1", api_key=API_KEY, max_retries=0)
    scored = client.completions.create(
        model="tinygpt", prompt=[ids], echo=True, logprobs=1, max_tokens=0, temperature=0
    )
    logprobs = scored.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None
    for position in range(1, len(ids)):
        served = logprobs.token_logprobs[position]
        assert served == pytest.approx(want[position - 1, ids[position]].item(), abs=1e-4)
    greedy = client.completions.create(
        model="tinygpt", prompt=ids, max_tokens=4, temperature=0, logprobs=2
    )
    generated = greedy.choices[0].logprobs
    assert len(generated.token_logprobs) == greedy.usage.completion_tokens
    for logprob, top in zip(generated.token_logprobs, generated.top_logprobs, strict=True):
        assert logprob == pytest.approx(max(top.values()), abs=1e-6)
