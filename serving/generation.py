"""What the gateway and a generation server say to each other: one call, a stream of chunks.

A call carries either prompts or chat messages (the server renders messages with the model's
chat template, since only it holds the tokenizer), the sampling settings, and ``n`` choices
per prompt. The server answers with a stream whose first chunk reports the prompt sizes (so
the gateway only starts a 200 once generation was accepted) and whose later chunks carry
each choice's new text; choice ``i * n + j`` is prompt ``i``'s ``j``-th sample.

    call = GenerateCall(request_id="r1", prompts=("Once upon",), max_tokens=8)
    async for chunk in handle.options(stream=True).generate.remote(call): ...
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_CHAT_TEMPLATE_NAME = "loom-plain"
"""Used when a tokenizer has no chat template: one ``role: content`` line per message, then
``assistant:`` (see ``render_plain_chat``)."""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    """system, developer, user or assistant (checked by the protocol adapter)."""
    content: str


@dataclass(frozen=True, kw_only=True)
class GenerateCall:
    request_id: str
    prompts: tuple[str, ...] = ()
    messages: tuple[ChatMessage, ...] = ()
    """Chat messages; when given, ``prompts`` is empty and the server renders one prompt."""
    max_tokens: int | None = None
    """None: as many as the context leaves room for (chat), capped by the server's limit."""
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False

    @property
    def choices(self) -> int:
        return max(1, len(self.prompts)) * self.n


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    index: int
    text: str
    completion_tokens: int
    """Tokens generated so far for this choice."""
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class GenerateChunk:
    version: str
    """The model version generating."""
    deltas: tuple[ChoiceDelta, ...] = ()
    prompt_tokens: tuple[int, ...] = field(default=())
    """Only on the first chunk: tokens in each prompt."""


class GenerationRefused(Exception):
    """The call cannot be served as asked (the gateway answers 400): an empty prompt,
    ``max_tokens`` beyond the model's context, and the like."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self):  # survives the hop back through Ray
        return (GenerationRefused, (self.message, self.param))


def render_plain_chat(messages: tuple[ChatMessage, ...]) -> str:
    """The default chat prompt: ``system: Be brief.\\nuser: Hi\\nassistant:``."""
    lines = [f"{m.role}: {m.content}" for m in messages]
    return "\n".join([*lines, "assistant:"])
