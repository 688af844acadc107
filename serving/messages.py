"""What crosses the gateway -> replica hop: the request envelope, the calls, the replies, and
the exceptions a replica answers with. Plain frozen dataclasses; nothing here imports Ray.

Every call carries an ``Envelope``: the request id (for logs), the deadline (wall-clock
``time.time()`` seconds; past it the client has stopped waiting) and the shard key the
gateway placed it by. The deadline is what lets each side drop work nobody waits for: the
gateway's coalescer leaves out requests that expired or were cancelled before it sends, a
replica's batcher skips expired parts before the engine runs, and a generation whose first
token has not come by then is cancelled. (Deadlines are absolute wall-clock times, so the
nodes' clocks must agree to well within a request timeout: NTP does that.)

One embed/classify call joins the inputs of one or more requests (``InferCall``: the inputs,
and one ``Part`` per request saying how many inputs are its own); its reply is one ``Rows``
object for the parts computed (``InferReply``). Every reply type is ``Rows``: it has a length,
cuts by ``slice`` and joins by ``concat``, so the batcher, the replica and the coalescer split
and join rows one way.

    envelope = Envelope(request_id="r-1", deadline_s=time.time() + 60)
    call = InferCall.join([(envelope, ["hello", "world"])])
    reply = await handle.infer.remote(call)           # InferReply[EmbedReply]
    reply.part_rows([2])                              # [EmbedReply of 2 rows]

    call = GenerateCall(envelope=envelope, prompts=("Once upon",), max_tokens=8)
    async for chunk in handle.options(stream=True).generate.remote(call): ...
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, Required, Self, TypedDict, TypeVar

import numpy as np

# ---- the envelope ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Envelope:
    """Who a call is for and until when: the request id, the deadline, the shard key."""

    request_id: str
    deadline_s: float = math.inf
    """Wall-clock time (``time.time()``) after which the answer is of no use to the client."""
    shard_key: str = ""
    """What the gateway placed the request by on a sharded model (``routing.sharding``)."""

    def remaining_s(self, now_s: float | None = None) -> float:
        """Seconds left until the deadline (negative once past it)."""
        return self.deadline_s - (time.time() if now_s is None else now_s)

    def expired(self, now_s: float | None = None) -> bool:
        return self.remaining_s(now_s) <= 0


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    """One client request after its protocol adapter: protocol-free from here on.

    InferenceRequest(model="minilm", inputs=("hello",), envelope=Envelope("r-1", deadline_s))
    """

    model: str
    inputs: tuple[Any, ...]
    """Texts, or for tensor models one FP32 feature row (a 1-D numpy array) per input."""
    envelope: Envelope


# ---- a replica's metadata ----------------------------------------------------------------------


class ModelInfo(TypedDict, total=False):
    """What a replica's ``info()`` says of the model it serves (the gateway's model metadata).

    Every kind names itself; the rest depends on the kind: an embed model its ``dim`` and
    ``max_length``, a classifier its ``input`` (``tensor``: ``features`` FP32 columns;
    ``text``) and ``labels``, a generate model its ``context_length`` and ``max_sequences``,
    a pool with no member named its ``members`` and those ``loaded`` on this replica.
    """

    name: Required[str]
    version: Required[str]
    task: Required[str]
    dim: int | None
    max_length: int | None
    input: Literal["tensor", "text"]
    features: int | None
    labels: list[str]
    context_length: int
    max_sequences: int
    members: dict[str, str]
    loaded: list[str]


def tensor_width(info: ModelInfo) -> int | None:
    """The FP32 row width a tensor classifier takes; None for a model that takes texts."""
    features = info.get("features")
    return features if info.get("input") == "tensor" else None


# ---- rows: every reply's shape -----------------------------------------------------------------


class Rows(Protocol):
    """Rows in input order: one per input, cut and joined the same way for every reply type."""

    def __len__(self) -> int: ...

    def slice(self, start: int, stop: int) -> Self:
        """Rows ``start`` .. ``stop - 1``."""
        ...

    @classmethod
    def concat(cls, parts: Sequence[Self]) -> Self:
        """The parts' rows, one after the other (at least one part)."""
        ...


R = TypeVar("R", bound=Rows)


def concat_rows(parts: Sequence[R]) -> R:
    """Join rows of one type; a single part is returned as it is (no copy)."""
    if len(parts) == 1:
        return parts[0]
    return type(parts[0]).concat(parts)


@dataclass(frozen=True, slots=True)
class EmbedReply:
    """An embedding model's rows."""

    vectors: np.ndarray
    """(n, dim) float32, L2-normalised."""
    token_counts: tuple[int, ...]
    version: str
    """The model version that computed it."""

    def __len__(self) -> int:
        return len(self.token_counts)

    def slice(self, start: int, stop: int) -> EmbedReply:
        return EmbedReply(self.vectors[start:stop], self.token_counts[start:stop], self.version)

    @classmethod
    def concat(cls, parts: Sequence[EmbedReply]) -> EmbedReply:
        return EmbedReply(
            vectors=np.concatenate([p.vectors for p in parts]),
            token_counts=tuple(c for p in parts for c in p.token_counts),
            version=parts[0].version,
        )


@dataclass(frozen=True, slots=True)
class ClassifyReply:
    """A classifier's rows."""

    probabilities: np.ndarray
    """(n, classes) float32; column j is the model's label j (see its metadata)."""
    version: str
    """The model version that computed it."""

    def __len__(self) -> int:
        return len(self.probabilities)

    def slice(self, start: int, stop: int) -> ClassifyReply:
        return ClassifyReply(self.probabilities[start:stop], self.version)

    @classmethod
    def concat(cls, parts: Sequence[ClassifyReply]) -> ClassifyReply:
        return ClassifyReply(np.concatenate([p.probabilities for p in parts]), parts[0].version)


# ---- embed / classify calls ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Part:
    """One request's share of a joined call: its envelope and how many inputs are its own."""

    envelope: Envelope
    count: int


def pack_inputs(inputs: Sequence[Any]) -> np.ndarray | list[str]:
    """What one call carries: feature rows stacked into one contiguous (n, features) array (one
    buffer over the hop, not n), texts as a list."""
    if len(inputs) and isinstance(inputs[0], np.ndarray):
        return np.stack(list(inputs))
    return list(inputs)


@dataclass(frozen=True, slots=True)
class InferCall:
    """One call to an embed or classify replica (``handle.infer.remote(call)``): the inputs of
    one or more requests, joined in part order."""

    inputs: np.ndarray | list[str]
    parts: tuple[Part, ...]

    @classmethod
    def join(cls, requests: Sequence[tuple[Envelope, Sequence[Any]]]) -> InferCall:
        """The call for ``(envelope, inputs)`` pairs, in order."""
        joined = [x for _, inputs in requests for x in inputs]
        parts = tuple(Part(envelope, len(inputs)) for envelope, inputs in requests)
        return cls(pack_inputs(joined), parts)

    def __len__(self) -> int:
        return len(self.inputs)

    def part_inputs(self) -> list[np.ndarray | list[str]]:
        """Each part's own inputs, in order."""
        cuts, offset = [], 0
        for part in self.parts:
            cuts.append(self.inputs[offset : offset + part.count])
            offset += part.count
        return cuts


@dataclass(frozen=True, slots=True)
class InferReply(Generic[R]):
    """A replica's answer to an ``InferCall``: the rows of every part it computed, in part
    order, and which parts it skipped because their deadline passed before the engine ran."""

    rows: R | None
    """None when no part was computed."""
    skipped: frozenset[int] = frozenset()
    """Indexes of the parts left out (no rows in ``rows``)."""

    def part_rows(self, counts: Sequence[int]) -> list[R | None]:
        """Each part's rows (``counts[i]`` inputs each), None for a skipped part."""
        out: list[R | None] = []
        offset = 0
        for i, count in enumerate(counts):
            if i in self.skipped or self.rows is None:
                out.append(None)
                continue
            out.append(self.rows if len(counts) == 1 else self.rows.slice(offset, offset + count))
            offset += count
        return out


GREEDY_BELOW_TEMPERATURE = 1e-5
"""A temperature below this samples greedily: the engine's floor
(``models.engines.sampling.MIN_SAMPLING_TEMPERATURE``, which imports torch; a test keeps the
two equal)."""


# ---- generation ----------------------------------------------------------------------------------

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
    """One completion or chat request to a generation replica.

    A call carries either prompts or chat messages (the replica renders messages with the
    model's chat template, since only it holds the tokenizer), the sampling settings, and
    ``n`` choices per prompt; choice ``i * n + j`` is prompt ``i``'s ``j``-th sample. The
    replica answers with a stream whose first chunk reports the prompt sizes (so the gateway
    only starts a 200 once generation was accepted) and whose later chunks carry each
    choice's new text.
    """

    envelope: Envelope
    prompts: tuple[str | tuple[int, ...], ...] = ()
    """Texts, or token ids (checked against the vocabulary by the replica)."""
    messages: tuple[ChatMessage, ...] = ()
    """Chat messages; when given, ``prompts`` is empty and the replica renders one prompt."""
    max_tokens: int | None = None
    """None: as many as the context leaves room for (chat), capped by the server's limit.
    0 (with ``echo``): score the prompt, generate nothing."""
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False
    logprobs: int | None = None
    """Each generated token's logprob and this many alternatives (0 to 20); None: none."""
    echo: bool = False
    """Each choice starts with its prompt (``ChoiceDelta.prompt_text``), with the prompt's
    logprobs too when ``logprobs`` is set."""

    @property
    def request_id(self) -> str:
        return self.envelope.request_id

    @property
    def repeatable(self) -> bool:
        """Run twice, it gives the same answer (greedy, or seeded): a gateway may send it
        again when the replica answering it is lost."""
        return self.temperature < GREEDY_BELOW_TEMPERATURE or self.seed is not None

    @property
    def choices(self) -> int:
        return max(1, len(self.prompts)) * self.n


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One position of a logprobs answer: the token's text, its logprob (None for a prompt's
    first token, which nothing predicts), and the most likely alternatives, best first."""

    token: str
    logprob: float | None
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    index: int
    text: str
    completion_tokens: int
    """Tokens generated so far for this choice."""
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    """The logprobs of the tokens generated since the previous delta (``logprobs`` calls)."""
    prompt_text: str | None = None
    """``echo`` calls, on a choice's first delta: the prompt, to put before its text."""
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    """``echo`` calls with ``logprobs``, on a choice's first delta: one per prompt token."""


@dataclass(frozen=True, slots=True)
class GenerateChunk:
    version: str
    """The model version generating."""
    deltas: tuple[ChoiceDelta, ...] = ()
    prompt_tokens: tuple[int, ...] = field(default=())
    """Only on the first chunk: tokens in each prompt."""


def render_plain_chat(messages: tuple[ChatMessage, ...]) -> str:
    """The default chat prompt: ``system: Be brief.\\nuser: Hi\\nassistant:``."""
    lines = [f"{m.role}: {m.content}" for m in messages]
    return "\n".join([*lines, "assistant:"])


# ---- what a replica may answer with --------------------------------------------------------------


class ReplicaError(Exception):
    """An answer a replica gives on purpose (the gateway maps each kind to its status); any
    other exception from a replica is a bug, answered 500 and logged."""


class Overloaded(ReplicaError):
    """A replica's admission is full; retry after ``retry_after_s`` (503)."""

    def __init__(self, model: str, retry_after_s: int) -> None:
        super().__init__(f"model {model} is overloaded; retry after {retry_after_s} s")
        self.model = model
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:  # survives the hop back through Ray
        return (Overloaded, (self.model, self.retry_after_s))


class InputRefused(ReplicaError):
    """A replica refused a request's inputs (400). The gateway checks inputs against the
    model's current version first; a replica still checks, since a canary version may take
    another shape."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (InputRefused, (self.message,))


class GenerationRefused(ReplicaError):
    """The call cannot be served as asked (400): an empty prompt, ``max_tokens`` beyond the
    model's context, and the like."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self) -> tuple[Any, ...]:
        return (GenerationRefused, (self.message, self.param))


class RequestTooLarge(ReplicaError):
    """One call would take more than its share of the replica's admission budget
    (``generation.max_request_share``): it can never be served whole, so 413, not 503."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self) -> tuple[Any, ...]:
        return (RequestTooLarge, (self.message, self.param))


class GenerationFailed(ReplicaError):
    """One of the call's sequences failed inside the engine (its sampling or its decoding);
    the other sequences in the batch went on (500)."""

    def __init__(self, model: str, reason: str) -> None:
        self.message = f"model {model} failed to generate: {reason}"
        super().__init__(self.message)
        self.model = model
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (GenerationFailed, (self.model, self.reason))


class ReplicaUnavailable(ReplicaError):
    """The replica can serve nothing more (its generation loop stopped) and is leaving so
    Serve replaces it (503, retry-able: another replica may answer)."""

    def __init__(self, model: str, reason: str) -> None:
        self.message = f"model {model}: this replica stopped serving ({reason}); retry"
        super().__init__(self.message)
        self.model = model
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (ReplicaUnavailable, (self.model, self.reason))


class InjectedFault(ReplicaError):
    """A call failed on purpose (config ``faults.error_probability``): 503, retry-able."""

    def __init__(self, model: str) -> None:
        super().__init__(f"model {model} failed the call (injected fault)")
        self.model = model

    def __reduce__(self) -> tuple[Any, ...]:
        return (InjectedFault, (self.model,))


class DeadlineExceeded(ReplicaError):
    """The request's deadline passed before it was computed (504); nothing was computed."""

    def __init__(self, model: str, request_id: str = "") -> None:
        super().__init__(f"model {model} did not answer within the deadline")
        self.model = model
        self.request_id = request_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (DeadlineExceeded, (self.model, self.request_id))


class ColdStart(ReplicaError):
    """The model had no replica running and none started within the request's deadline
    (scaled to zero, or its one replica being replaced): 503, Retry-After, one is coming."""

    def __init__(self, model: str, request_id: str = "") -> None:
        self.message = f"model {model} has no replica running yet (one is starting); retry"
        super().__init__(self.message)
        self.model = model
        self.request_id = request_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (ColdStart, (self.model, self.request_id))
