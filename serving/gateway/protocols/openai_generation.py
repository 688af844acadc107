"""OpenAI-compatible text generation: ``/v1/completions`` and ``/v1/chat/completions``.

Requests become a ``GenerateCall``; replies and stream chunks are written in OpenAI's shapes
(``text_completion`` / ``chat.completion`` objects, ``chat.completion.chunk`` deltas, SSE
``data: {...}`` lines ending in ``data: [DONE]``). Supported: ``max_tokens`` (chat also
``max_completion_tokens``), ``temperature``, ``top_p``, ``stop``, ``seed``, ``n``, ``stream``,
``stream_options.include_usage``, and ``ignore_eos`` (an extension, as in vLLM).
``suffix`` and ``best_of`` > 1 are refused with 400 rather than silently ignored.

Scoring, what evaluation harnesses need (lm-evaluation-harness's ``local-completions``):
completions take prompts as token ids (one list, or a list of lists), ``logprobs`` (0 to 20:
each token's logprob and the top N, in the legacy ``{tokens, token_logprobs, top_logprobs,
text_offset}`` shape, ``top_logprobs`` holding the chosen token too, as vLLM's) and ``echo``
(the prompt before the text, with its own logprobs; the first token's is null), and
``max_tokens: 0`` with ``echo`` scores the prompt without generating. Chat takes
``logprobs: true`` and ``top_logprobs`` (0 to 20) in its ``{content: [...]}`` shape. A
generated token's logprob is of the distribution it was drawn from: the logits divided by the
temperature (at temperature 0, as they are), before top-p; a prompt token's, of the logits as
they are.

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
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from models.engines.sampling import MAX_LOGPROBS, SEED_MAX, SEED_MIN
from serving.messages import ChatMessage, ChoiceDelta, Envelope, GenerateCall, TokenLogprob

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


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    # OpenAI's default for completions; 0 only with echo (checked by ``scoring_refusal``)
    max_tokens: int | None = Field(16, ge=0, le=MAX_TOKENS)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, value: object) -> object:
        """A string, a list of strings, a list of token ids, or a list of those lists; a
        token id is a non-negative int (the replica checks it against the vocabulary)."""
        if not isinstance(value, list):
            return value
        if not value:
            raise ValueError("prompt must not be an empty list")
        if all(isinstance(p, str) for p in value) or _token_ids(value):
            return value
        if all(isinstance(p, list) for p in value):
            for i, ids in enumerate(value):
                if not ids:
                    raise ValueError(f"prompt[{i}] is an empty list of token ids")
                if not _token_ids(ids):
                    raise ValueError(f"prompt[{i}] must hold token ids (integers >= 0)")
            return value
        raise ValueError(
            "prompt must be a string, a list of strings, a list of token ids (integers >= 0), "
            "or a list of such lists"
        )

    # one validator per field, so the 400 names the field (a model validator names none)
    @field_validator("suffix")
    @classmethod
    def _unsupported(cls, value: object) -> object:
        if value is not None:
            raise ValueError("not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("not supported (only 1)")
        return value

    def prompts(self) -> tuple[str | tuple[int, ...], ...]:
        """Each prompt: a text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return (prompt,)
        out: list[str | tuple[int, ...]] = []
        for p in prompt:
            if isinstance(p, int):  # one list of token ids: one prompt
                return (tuple(i for i in prompt if isinstance(i, int)),)
            out.append(p if isinstance(p, str) else tuple(p))
        return tuple(out)

    def scoring_refusal(self) -> str | None:
        """Why ``max_tokens`` cannot be 0: only with ``echo`` is there anything to answer."""
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens: must be at least 1 unless echo is true (prompt scoring)"
        return None

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
            logprobs=self.logprobs,
            echo=self.echo,
        )


def _token_ids(values: list[Any]) -> bool:
    """A non-empty list of ints >= 0 (bools are not token ids)."""
    return bool(values) and all(
        type(v) is int and v >= 0  # noqa: E721 (bool is an int subclass)
        for v in values
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
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("logprobs must be true to ask for top_logprobs")
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
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
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


def completion_logprobs(entries: list[TokenLogprob], offset: int = 0) -> dict[str, list[Any]]:
    """OpenAI's legacy logprobs object: ``text_offset`` counts characters from ``offset`` (the
    choice's text so far); ``top_logprobs`` maps token text to logprob, the chosen token
    included (as vLLM), null where the token has no logprob (a prompt's first)."""
    tokens: list[str] = []
    logprobs: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for entry in entries:
        tokens.append(entry.token)
        logprobs.append(entry.logprob)
        if entry.logprob is None:
            tops.append(None)
        else:
            top = dict(entry.top)
            top.setdefault(entry.token, entry.logprob)
            tops.append(top)
        offsets.append(offset)
        offset += len(entry.token)
    return {
        "tokens": tokens,
        "token_logprobs": logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_logprobs(entries: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    """The chat shape: one ``{token, logprob, bytes, top_logprobs}`` per generated token."""

    def one(token: str, logprob: float | None) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    content = [
        {**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
        for e in entries
    ]
    return {"content": content, "refusal": None}


def echoed(choice: ChoiceDelta) -> tuple[str, list[TokenLogprob]]:
    """A choice's text and logprobs, its echoed prompt (if any) first."""
    entries = [*(choice.prompt_logprobs or ()), *choice.logprobs]
    return (choice.prompt_text or "") + choice.text, entries


def completion_response(
    *,
    id: str,
    created_s: int,
    model: str,
    call: GenerateCall,
    choices: tuple[ChoiceDelta, ...],
    usage: dict,
) -> bytes:
    rows = []
    for c in choices:
        text, entries = echoed(c)
        logprobs = None if call.logprobs is None else completion_logprobs(entries)
        rows.append(
            {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}
        )
    body = {
        "id": id,
        "object": "text_completion",
        "created": created_s,
        "model": model,
        "choices": rows,
        "usage": usage,
    }
    return orjson.dumps(body)


def chat_response(
    *,
    id: str,
    created_s: int,
    model: str,
    call: GenerateCall,
    choices: tuple[ChoiceDelta, ...],
    usage: dict,
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
                "logprobs": None if call.logprobs is None else chat_logprobs(c.logprobs),
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

    def __init__(
        self, *, chat: bool, id: str, created_s: int, model: str, logprobs: bool = False
    ) -> None:
        self._chat = chat
        self._logprobs = logprobs
        self._offsets: dict[int, int] = {}
        """Characters of each choice's text sent so far (``text_offset`` goes on from there)."""
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
            # every stream's hot path: the logprob entries are gathered only when asked for
            text = d.text if d.prompt_text is None else d.prompt_text + d.text
            entries = echoed(d)[1] if self._logprobs else []
            if not text and d.finish_reason is None and not entries:
                continue
            logprobs: dict[str, Any] | None = None
            if self._chat:
                delta = {"content": text} if text else {}
                if self._logprobs:
                    logprobs = chat_logprobs(d.logprobs)
                choice = {"index": d.index, "delta": delta, "logprobs": logprobs,
                          "finish_reason": d.finish_reason}  # fmt: skip
            else:
                offset = self._offsets.get(d.index, 0)
                if self._logprobs:
                    logprobs = completion_logprobs(entries, offset)
                self._offsets[d.index] = offset + len(text)
                choice = {"index": d.index, "text": text, "logprobs": logprobs,
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
