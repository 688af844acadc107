"""OpenAI-compatible text generation: ``/v1/completions`` and ``/v1/chat/completions``.

Requests become a ``GenerateCall``; replies and stream chunks are written in OpenAI's shapes
(``text_completion`` / ``chat.completion`` objects, ``chat.completion.chunk`` deltas, SSE
``data: {...}`` lines ending in ``data: [DONE]``). Supported: ``max_tokens`` (chat also
``max_completion_tokens``), ``temperature``, ``top_p``, ``stop``, ``seed``, ``n``, ``stream``,
``stream_options.include_usage``, and ``ignore_eos`` (an extension, as in vLLM). ``logprobs``,
``echo``, ``suffix`` and ``best_of`` > 1 are refused with 400 rather than silently ignored.

Every numeric field has a range (``Field`` bounds below, documented in docs/api.md); outside
it the request is a 400 naming the field, before it reaches a replica:

- ``max_tokens`` / ``max_completion_tokens``: 1 to ``MAX_TOKENS`` (the replica then holds the
  prompt plus them to the model's context);
- ``temperature``: 0 to 2; below 1e-5 (``models.engines.sampling.MIN_SAMPLING_TEMPERATURE``)
  it is greedy, as 0 is;
- ``top_p``: above 0, at most 1;
- ``n``: 1 to ``MAX_CHOICES``;
- ``seed``: an int64, ``SEED_MIN`` to ``SEED_MAX`` (what torch's generators take).
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.engines.sampling import SEED_MAX, SEED_MIN
from serving.messages import ChatMessage, ChoiceDelta, Envelope, GenerateCall

MAX_STOP_STRINGS = 4
MAX_TOKENS = 2**31 - 1
"""The most tokens a request may ask for (an int32 count); the model's context is the real
bound, checked by the replica."""
MAX_TEMPERATURE = 2.0
MAX_CHOICES = 16
SSE_DONE = b"data: [DONE]\n\n"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompts(cls, value: object) -> object:
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be an empty list")
            if not all(isinstance(p, str) for p in value):
                raise ValueError(
                    "prompt must be a string or a list of strings (token arrays are not supported)"
                )
        return value

    # one validator per field, so the 400 names the field (a model validator names none)
    @field_validator("echo", "logprobs", "suffix")
    @classmethod
    def _unsupported(cls, value: object) -> object:
        if value is not None and value is not False:  # logprobs 0 too: it asks for logprobs
            raise ValueError("not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("not supported (only 1)")
        return value

    def prompts(self) -> tuple[str, ...]:
        return (self.prompt,) if isinstance(self.prompt, str) else tuple(self.prompt)

    def call(self, envelope: Envelope) -> GenerateCall:
        return GenerateCall(
            envelope=envelope,
            prompts=self.prompts(),
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stops(),
            seed=self.seed,
            n=self.n,
            ignore_eos=self.ignore_eos,
        )


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False

    @field_validator("logprobs")
    @classmethod
    def _unsupported(cls, value: bool) -> bool:
        if value:
            raise ValueError("not supported")
        return value

    def call(self, envelope: Envelope) -> GenerateCall:
        return GenerateCall(
            envelope=envelope,
            messages=tuple(ChatMessage(m.role, m.text()) for m in self.messages),
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stops(),
            seed=self.seed,
            n=self.n,
            ignore_eos=self.ignore_eos,
        )


# ---- replies --------------------------------------------------------------------------


def usage(prompt_tokens: tuple[int, ...], completion_tokens: int, n: int) -> dict[str, int]:
    """Every prompt counts once per sample: 2 prompts of 5 tokens with n=2 -> 20."""
    prompt = sum(prompt_tokens) * n
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


def completion_response(
    *, id: str, created_s: int, model: str, choices: tuple[ChoiceDelta, ...], usage: dict
) -> bytes:
    body = {
        "id": id,
        "object": "text_completion",
        "created": created_s,
        "model": model,
        "choices": [
            {"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
            for c in choices
        ],
        "usage": usage,
    }
    return orjson.dumps(body)


def chat_response(
    *, id: str, created_s: int, model: str, choices: tuple[ChoiceDelta, ...], usage: dict
) -> bytes:
    body = {
        "id": id,
        "object": "chat.completion",
        "created": created_s,
        "model": model,
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": usage,
    }
    return orjson.dumps(body)


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


class ChunkWriter:
    """Writes one request's SSE events in the shape of its route (completion or chat)."""

    def __init__(self, *, chat: bool, id: str, created_s: int, model: str) -> None:
        self._chat = chat
        self._head = {
            "id": id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created_s,
            "model": model,
        }

    def roles(self, choices: int) -> bytes:
        """Chat streams open each choice with the assistant role (nothing for completions)."""
        if not self._chat:
            return b""
        return b"".join(
            self._event(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )  # fmt: skip
            for i in range(choices)
        )

    def deltas(self, deltas: tuple[ChoiceDelta, ...]) -> bytes:
        out = []
        for d in deltas:
            if not d.text and d.finish_reason is None:
                continue
            if self._chat:
                delta = {"content": d.text} if d.text else {}
                choice = {"index": d.index, "delta": delta, "logprobs": None,
                          "finish_reason": d.finish_reason}  # fmt: skip
            else:
                choice = {"index": d.index, "text": d.text, "logprobs": None,
                          "finish_reason": d.finish_reason}  # fmt: skip
            out.append(self._event([choice]))
        return b"".join(out)

    def usage(self, usage: dict) -> bytes:
        return sse({**self._head, "choices": [], "usage": usage})

    def error(self, message: str, code: str) -> bytes:
        """A failure after the stream began: an error event (the status is already 200)."""
        return sse(
            {"error": {"message": message, "type": "api_error", "param": None, "code": code}}
        )

    def _event(self, choices: list[dict]) -> bytes:
        return sse({**self._head, "choices": choices})
