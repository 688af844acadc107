"""A generation replica admits by tokens, not prompts: a call costs its prompts x n x
(prompt tokens + max_tokens), and one call may take at most ``max_request_share`` of the
budget (413 request_too_large, naming the product); past the budget it is the 503."""

from __future__ import annotations

import asyncio

import pytest
from tiny_replicas import tiny_generation_replica

from serving.gateway.errors import api_error
from serving.messages import Envelope, GenerateCall, Overloaded, RequestTooLarge
from serving.replicas.admission import share_refusal
from serving.replicas.generation import GenerationReplica

MODEL = "tiny-gen-admission"


def refusal(prompts: int, n: int, tokens: int, max_tokens: int | None = 16) -> str | None:
    return share_refusal(
        prompts=prompts,
        n=n,
        tokens=tokens,
        max_tokens=max_tokens,
        max_queued=1024,
        max_queued_tokens=262_144,
        share=0.5,
        context_length=1024,
    )


def test_sixty_four_prompts_times_n_sixteen_is_more_than_half_the_sequences() -> None:
    # 64 x 16 = 1024 sequences > 0.5 x 1024 = 512: it would fill the whole queue
    message = refusal(64, 16, tokens=64 * 16 * 20)
    assert message is not None
    assert "64 prompts x n 16 = 1024 sequences" in message
    assert "(512: generation.max_request_share 0.5" in message


def test_the_token_product_counts_not_the_number_of_prompts() -> None:
    # 8 prompts x n 4 = 32 sequences (fine) x (8 + 1016) tokens = 32,768 tokens: fine
    assert refusal(8, 4, tokens=32 * 1024, max_tokens=1016) is None
    # 128 prompts x n 2 = 256 sequences x 1024 tokens = 262,144 > 131,072: refused
    message = refusal(128, 2, tokens=256 * 1024, max_tokens=1016)
    assert message is not None
    assert "128 prompts x n 2 x (prompt tokens + max_tokens 1016) = 262144 tokens" in message
    # exactly the share: 128 sequences x 1024 = 131,072 = 0.5 x 262,144 -> admitted
    assert refusal(128, 1, tokens=128 * 1024) is None


def test_one_full_context_sequence_always_fits_whatever_the_share() -> None:
    tiny = {"max_queued": 1, "max_queued_tokens": 64, "share": 0.1, "context_length": 1024}
    assert share_refusal(prompts=1, n=1, tokens=1024, max_tokens=None, **tiny) is None
    assert share_refusal(prompts=1, n=2, tokens=2048, max_tokens=None, **tiny) is not None


def test_a_request_too_large_is_a_413_naming_the_product() -> None:
    error = api_error(RequestTooLarge("64 prompts x n 16 = 1024 sequences, ...", param="n"))
    assert error is not None
    assert (error.status, error.code, error.param) == (413, "request_too_large", "n")


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> GenerationReplica:
    return tiny_generation_replica(
        tmp_path_factory.mktemp("gen"),
        MODEL,
        generation={"max_sequences": 4, "max_queued_tokens": 64, "max_request_share": 0.5},
        limits={"max_queued": 8},
    )


def call(prompts: int, n: int, max_tokens: int) -> GenerateCall:
    envelope = Envelope("r", float("inf"))
    return GenerateCall(
        envelope=envelope, prompts=("def main",) * prompts, n=n, max_tokens=max_tokens
    )


def test_the_replica_refuses_a_call_past_its_share_and_admits_by_tokens(
    replica: GenerationReplica,
) -> None:
    # 5 sequences > 0.5 x 8 = 4: too large, whatever the tokens
    with pytest.raises(RequestTooLarge) as large:
        asyncio.run(replica.complete(call(5, 1, 2)))
    assert "5 prompts x n 1 = 5 sequences" in large.value.message

    async def scenario() -> None:
        # 2 prompts x n 2 x (p prompt tokens + 6): 4 (p + 6) of the 64 tokens, admitted
        first = replica.generate(call(2, 2, 6))
        accepted = await anext(first)
        prompt_tokens = accepted.prompt_tokens[0]
        assert replica._token_admission.admitted == 4 * (prompt_tokens + 6)
        # the same again: 4 + 4 = 8 sequences fit limits.max_queued 8, but 2 x 4 (p + 6)
        # tokens pass 64 -> 503 with Retry-After, not a 413
        assert 2 * 4 * (prompt_tokens + 6) > 64
        with pytest.raises(Overloaded):
            await anext(replica.generate(call(2, 2, 6)))
        await first.aclose()

    asyncio.run(scenario())
    assert replica._token_admission.admitted == 0  # every token given back
    assert replica._admission.admitted == 0
