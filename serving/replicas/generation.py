"""The generation replica: one generate model, replicated (ch. 6), continuously batched
(ch. 15).

A replica loads the model into a ``GenerationEngine`` whose background thread runs
transformers' continuous batching; every call adds its sequences to the running batch.
``generate`` is a streaming method: its first chunk says the prompts were accepted, then each
chunk carries every choice's text produced since the previous chunk (under load one chunk
holds several steps, so the stream's cost does not grow with the step rate). When the caller
goes away, Ray Serve cancels the generator and the ``finally`` cancels its sequences, freeing
their slots at once. A call's deadline bounds its wait for a first token: past it, with no
token yet (queued behind a full batch, say), its sequences are cancelled and the call ends
with ``DeadlineExceeded``, so a slot never goes to a client that stopped waiting. A call
whose deadline passed before it reached the replica is refused before it touches the engine.

Admission counts sequences (``limits.max_queued``) and tokens (``generation.max_queued_tokens``:
each sequence's prompt tokens plus its ``max_tokens``, so ``prompts x n x max_tokens`` is what a
call costs, not its number of prompts): a call that would pass either is refused with
``Overloaded`` and a Retry-After from the measured rate at which sequences finish. One call may
take at most ``generation.max_request_share`` of either budget; a larger one is refused with
``RequestTooLarge`` (413): it could never be served whole.

Faults stay with their call: a sequence whose sampling or decoding failed ends its call with
``GenerationFailed`` (500; a stream ends with an error event) and the batch goes on. If the
engine's loop dies anyway, the replica hears of it at once (``GenerationEngine.on_stopped``):
every call it holds ends with ``ReplicaUnavailable`` (503), new calls are refused the same
way, ``check_health`` raises, and once its calls have ended (or ``LEAVE_GRACE_S`` passed) the
replica leaves: its actor exits, so Serve's routers stop sending to it on the spot and the
controller replaces it at its next check (an unhealthy answer would take three checks,
``health_check_period_s`` apart).

    call = GenerateCall(envelope=Envelope("r", deadline_s=...), prompts=("Hi",))
    handle.options(stream=True).generate.remote(call)
    await handle.complete.remote(call)   # the whole answer in one reply
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from models.engines.generate import (
    EngineStopped,
    GenerationEngine,
    PromptError,
    SamplingParams,
    SequenceUpdate,
    TokenLogprobs,
    sample_seed,
)
from models.store import ModelStore
from serving.config.model import ModelConfig, parse_entry
from serving.messages import (
    ChoiceDelta,
    DeadlineExceeded,
    GenerateCall,
    GenerateChunk,
    GenerationFailed,
    GenerationRefused,
    ModelInfo,
    ReplicaUnavailable,
    RequestTooLarge,
    TokenLogprob,
    render_plain_chat,
)
from serving.monitoring.sidecar_actor import ReplicaMonitoring, report_to_sidecar
from serving.monitoring.stats import replica_stats
from serving.replica_logging import route_to_serve_log
from serving.replicas.admission import Admission, share_refusal
from serving.replicas.core import LoadedModel, load_model

logger = logging.getLogger(__name__)

STATS_PERIOD_S = 0.25
"""How often the running/waiting sequence gauges are refreshed."""

LEAVE_GRACE_S = 10.0
"""A replica whose engine died waits at most this long for its calls to end before leaving."""
LEAVE_POLL_S = 0.05
REPLY_GRACE_S = 1.0
"""After its last call ended, how long a leaving replica lets the replies reach their callers."""

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "seed", "stop", "logprobs")
"""The call fields a ``SamplingParams`` error may name (its message starts with the name)."""


def leave_this_replica() -> None:
    """End this replica's actor, so Serve replaces it. Outside Serve (a replica made in a
    test, with no Ray) there is nothing to leave."""
    import ray  # here: the replica's module is used without Ray too

    if not ray.is_initialized():
        return
    ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


_Item = tuple[int, SequenceUpdate, float]
"""(choice index, update, perf_counter time it was produced)."""


class _Inbox:
    """One call's updates: filled on the generation thread, drained on the replica's loop.

    The loop is woken only when a chunk is due (a choice's first text, a choice's end, or
    ``interval_s`` since the last chunk), not on every step: at 32 streams and ~40 steps/s
    that is the difference between ~1300 and ~300 wake-ups a second.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, choices: int, interval_s: float) -> None:
        self._loop = loop
        self._interval_s = interval_s
        self._event = asyncio.Event()
        self._items: collections.deque[_Item] = collections.deque()  # thread-safe append/pop
        self._started = [False] * choices
        self._woken = False
        self.last_chunk_s = 0.0

    def deliver(self, index: int, update: SequenceUpdate) -> None:
        """On the generation thread: keep the update; wake the loop if a chunk is due."""
        now = time.perf_counter()
        self._items.append((index, update, now))  # before the check: see take()
        if self._woken:
            return
        first = not self._started[index]
        if first or update.finished or now - self.last_chunk_s >= self._interval_s:
            self._started[index] = True
            self._woken = True
            self._loop.call_soon_threadsafe(self._event.set)

    async def take(self, timeout_s: float | None = None) -> list[_Item]:
        """Wait until a chunk is due; everything delivered so far (``TimeoutError`` after
        ``timeout_s``). An update appended after the drain below sees ``_woken`` False and
        wakes the loop itself if it is due."""
        if timeout_s is None or timeout_s == math.inf:
            await self._event.wait()
        else:
            await asyncio.wait_for(self._event.wait(), max(timeout_s, 0.0))
        self._event.clear()
        self._woken = False
        items = []
        while self._items:
            items.append(self._items.popleft())
        return items


class _Choice:
    """Latency bookkeeping of one sequence (for the TTFT and inter-token histograms), and
    whether its first delta (which carries an echoed prompt) went out."""

    __slots__ = ("last_s", "started", "tokens")

    def __init__(self) -> None:
        self.last_s = 0.0
        self.tokens = 0
        self.started = False


class GenerationReplica:
    """Serves one generate model: ``generate`` (streamed chunks) and ``complete`` (whole)."""

    def __init__(
        self,
        model: dict[str, Any],
        models_dir: str,
        monitoring: ReplicaMonitoring | None = None,
    ) -> None:
        """``monitoring``: where the replica reports its stats (None: kept in ``stats``
        only, for a replica built outside a server)."""
        route_to_serve_log()
        config = parse_entry(model)
        if not isinstance(config, ModelConfig) or config.task != "generate":
            raise ValueError(f"model {config.name} is not a generate model")
        self._config = config
        self.stats = replica_stats("generate")
        settings = config.generation
        # the engine runs its own generation thread: no engine thread of the replica's
        self._model: LoadedModel[GenerationEngine] = load_model(
            config,
            ModelStore(Path(models_dir)),
            runner=None,
            stats=self.stats,
            max_sequences=settings.max_sequences,
            max_batch_tokens=settings.max_batch_tokens,
            kv_cache_tokens=settings.kv_cache_tokens,
        )
        self._engine = self._model.engine
        self._version = self._model.version
        self._admission = self._model.admission  # counts sequences
        # and tokens: prompt + max_tokens per sequence, what a call will hold of the engine
        self._token_admission = Admission(config.name, settings.max_queued_tokens)
        self._stats = self._model.stats
        self._stats_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        """The replica's event loop, known from its first call (the constructor has none)."""
        self._calls = 0
        """Calls in progress (streams open, answers being gathered)."""
        self._stopped: str | None = None
        """Why the engine's loop stopped; from then on every call is refused."""
        self._leaving: asyncio.Task[None] | None = None
        self._leave: Callable[[], None] = leave_this_replica
        self._engine.on_stopped(self._on_engine_stopped)
        # from here on the node's sidecar sees this replica (loaded: ready to serve)
        self._reporter = report_to_sidecar(self.stats, monitoring)

    # ---- the calls ------------------------------------------------------------------

    def generate(self, call: GenerateCall) -> AsyncIterator[GenerateChunk]:
        """The answer as a stream: a first chunk with the prompt sizes, then the choices' new
        text, at most one chunk per ``stream_interval_ms`` after each choice's first text."""
        return self._stream(call, self._config.generation.stream_interval_ms / 1000.0)

    async def _stream(self, call: GenerateCall, interval_s: float) -> AsyncIterator[GenerateChunk]:
        arrived_s = time.perf_counter()
        if self._loop is None:  # the replica's event loop exists once calls arrive
            self._loop = asyncio.get_running_loop()
            self._stats_task = self._loop.create_task(self._report_stats_every())
        if self._stopped is not None:
            self._leave_when_drained()  # the engine died before any call told the loop
            raise ReplicaUnavailable(self._config.name, self._stopped)
        prompts = self._prompt_ids(call)
        wanted = len(prompts) * call.n
        if call.envelope.expired():  # it waited in Serve's queue past its deadline
            self._stats.inc("expired", wanted)
            raise DeadlineExceeded(self._config.name, call.request_id)
        tokens = self._admit(call, prompts)  # or RequestTooLarge, or Overloaded
        inbox = _Inbox(asyncio.get_running_loop(), wanted, interval_s)
        seq_ids: list[str] = []
        self._calls += 1
        self._stats.enter(wanted, requests=1)
        try:
            for i, ids in enumerate(prompts):
                for j in range(call.n):
                    deliver = functools.partial(inbox.deliver, i * call.n + j)
                    params = self._params(call, len(ids), sample=j)
                    seq_ids.append(self._submit(call, ids, params, deliver))
            yield GenerateChunk(self._version, prompt_tokens=tuple(len(p) for p in prompts))
            choices = [_Choice() for _ in range(wanted)]
            unfinished = wanted
            started = False  # a first token came: the deadline no longer applies
            while unfinished:
                try:
                    items = await inbox.take(None if started else call.envelope.remaining_s())
                except TimeoutError:  # no token by the deadline: give the slots back
                    self._stats.inc("expired", wanted)
                    raise DeadlineExceeded(self._config.name, call.request_id) from None
                if not items:
                    continue
                started = True
                deltas = self._merge(call, prompts, items, choices, arrived_s)
                unfinished -= sum(d.finish_reason is not None for d in deltas)
                inbox.last_chunk_s = time.perf_counter()
                yield GenerateChunk(self._version, deltas=deltas)
        finally:
            for seq_id in seq_ids:
                self._engine.cancel(seq_id)  # a no-op for finished ones; frees the rest
            self._admission.release(wanted)
            self._token_admission.release(tokens)
            self._calls -= 1
            self._stats.leave(wanted, 1, seconds=time.perf_counter() - arrived_s)

    def _admit(self, call: GenerateCall, prompts: list[list[int]]) -> int:
        """Admit the call's sequences and tokens (each prompt's tokens + its max_tokens, n
        times): the tokens taken. ``RequestTooLarge`` (413) for a call larger than its share
        of either budget; ``Overloaded`` (503, Retry-After) while the replica is full."""
        settings = self._config.generation
        context = self.context_length
        # a sequence holds at most the context: prompt + max_tokens (checked <= context)
        most = context if call.max_tokens is None else max(1, call.max_tokens)
        per_prompt = [min(context, len(ids) + most) for ids in prompts]
        tokens = call.n * sum(per_prompt)
        refusal = share_refusal(
            prompts=len(prompts),
            n=call.n,
            tokens=tokens,
            max_tokens=call.max_tokens,
            max_queued=self._admission.limit,
            max_queued_tokens=self._token_admission.limit,
            share=settings.max_request_share,
            context_length=context,
        )
        if refusal is not None:
            raise RequestTooLarge(refusal, param="n" if call.n > 1 else "prompt")
        wanted = len(prompts) * call.n
        self._admission.admit(wanted)  # or Overloaded, with a measured Retry-After
        try:
            # a call of one full context on a budget smaller than that waits for an empty one
            self._token_admission.admit(min(tokens, self._token_admission.limit))
        except BaseException:
            self._admission.release(wanted)
            raise
        return min(tokens, self._token_admission.limit)

    async def complete(self, call: GenerateCall) -> GenerateChunk:
        """The whole answer in one reply: ``prompt_tokens`` and one delta per choice."""
        prompt_tokens: tuple[int, ...] = ()
        parts: dict[int, list[ChoiceDelta]] = {}
        async for chunk in self._stream(call, math.inf):  # no partial chunks: nobody reads them
            prompt_tokens = prompt_tokens or chunk.prompt_tokens
            for delta in chunk.deltas:
                parts.setdefault(delta.index, []).append(delta)
        deltas = tuple(join_deltas(parts[i]) for i in sorted(parts))
        return GenerateChunk(self._version, deltas=deltas, prompt_tokens=prompt_tokens)

    def info(self) -> ModelInfo:
        return {
            "name": self._config.name,
            "version": self._version,
            "task": "generate",
            "context_length": self._engine.context_length,
            "max_sequences": self._engine.max_sequences,
        }

    def check_health(self) -> None:
        """A replica whose generation loop died is unhealthy from that moment; Ray Serve
        replaces it (sooner: the replica leaves once its calls have ended)."""
        if self._stopped is not None:
            raise RuntimeError(f"the generation loop has stopped: {self._stopped}")
        self._engine.check()

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.close()
        reporter = getattr(self, "_reporter", None)
        if reporter is not None:
            reporter.close()

    # ---- helpers --------------------------------------------------------------------

    def _prompt_ids(self, call: GenerateCall) -> list[list[int]]:
        """Each prompt's token ids, checked against the context (``GenerationRefused``)."""
        texts: list[str | tuple[int, ...]]
        if call.messages:
            texts = [self._render_chat(call)]
            param = "messages"
        else:
            texts = list(call.prompts)
            param = "prompt"
        ids = []
        for text in texts:
            if isinstance(text, tuple):  # token ids: the engine checks them against the vocabulary
                tokens = list(text)
            else:
                tokens = self._engine.tokenizer(text)["input_ids"] if text else []
            if not tokens:
                raise GenerationRefused("the prompt is empty", param=param)
            # max_tokens 0 (prompt scoring) still takes the step that ends the prefill
            if (
                call.max_tokens is not None
                and len(tokens) + max(1, call.max_tokens) > self.context_length
            ):
                raise GenerationRefused(
                    f"{len(tokens)} prompt tokens + max_tokens {call.max_tokens} exceed the "
                    f"model's context of {self.context_length} tokens",
                    param="max_tokens",
                )
            if len(tokens) >= self.context_length:
                raise GenerationRefused(
                    f"the prompt has {len(tokens)} tokens; the model's context is "
                    f"{self.context_length}",
                    param=param,
                )
            ids.append(tokens)
        return ids

    @property
    def context_length(self) -> int:
        return self._engine.context_length

    def _render_chat(self, call: GenerateCall) -> str:
        tokenizer = self._engine.tokenizer
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": m.role, "content": m.content} for m in call.messages]
            rendered = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            if not isinstance(rendered, str):  # tokenize=False renders text
                raise TypeError(f"the chat template rendered {type(rendered).__name__}")
            return rendered
        return render_plain_chat(call.messages)

    def _params(self, call: GenerateCall, prompt_tokens: int, *, sample: int) -> SamplingParams:
        if call.max_tokens is None:
            max_tokens = self.context_length - prompt_tokens
        else:
            max_tokens = call.max_tokens
        # n samples differ, repeatably; wrapped to stay an int64
        seed = None if call.seed is None else sample_seed(call.seed, sample)
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=call.temperature,
                top_p=call.top_p,
                stop=call.stop,
                seed=seed,
                ignore_eos=call.ignore_eos,
                logprobs=call.logprobs,
                prompt_logprobs=call.logprobs if call.echo else None,
            )
        except ValueError as exc:  # "temperature must be ..." names its field
            message = str(exc)
            param = next((f for f in SAMPLING_FIELDS if message.startswith(f)), None)
            raise GenerationRefused(message, param=param) from None

    def _submit(
        self,
        call: GenerateCall,
        ids: list[int],
        params: SamplingParams,
        deliver: Callable[[SequenceUpdate], None],
    ) -> str:
        try:
            return self._engine.submit(ids, params, on_update=deliver)
        except PromptError as exc:
            raise GenerationRefused(
                str(exc), param="messages" if call.messages else "prompt"
            ) from None
        except EngineStopped as exc:
            raise ReplicaUnavailable(self._config.name, str(exc)) from None

    # ---- when the engine's loop dies ----------------------------------------------------

    def _on_engine_stopped(self, reason: str) -> None:
        """On the generation thread, the moment the loop ends: refuse calls from now on, and
        leave once the calls held have ended (their sequences are failed by the engine)."""
        self._stopped = reason
        logger.error(
            "model %s: the generation loop stopped (%s); leaving", self._config.name, reason
        )
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the replica is going
                loop.call_soon_threadsafe(self._leave_when_drained)

    def _leave_when_drained(self) -> None:
        """On the replica's loop: start leaving, once."""
        if self._leaving is None:
            self._leaving = asyncio.get_running_loop().create_task(self._leave_after_calls())

    async def _leave_after_calls(self) -> None:
        waited_s = 0.0
        while self._calls and waited_s < LEAVE_GRACE_S:  # their error replies are on the way
            await asyncio.sleep(LEAVE_POLL_S)
            waited_s += LEAVE_POLL_S
        await asyncio.sleep(REPLY_GRACE_S)
        logger.error("model %s: this replica leaves so Serve replaces it", self._config.name)
        self._leave()

    def _merge(
        self,
        call: GenerateCall,
        prompts: list[list[int]],
        items: list[_Item],
        choices: list[_Choice],
        arrived_s: float,
    ) -> tuple[ChoiceDelta, ...]:
        """One delta per choice from its updates in arrival order: texts and logprobs
        joined, the latest count and finish reason; a choice's first delta carries its echoed
        prompt. A failed sequence fails its call: ``ReplicaUnavailable`` when the engine's
        loop died under it, else ``GenerationFailed`` (its own fault)."""
        texts: dict[int, list[str]] = {}
        last: dict[int, SequenceUpdate] = {}
        logprobs: dict[int, list[TokenLogprobs]] = {}
        prompt_logprobs: dict[int, tuple[TokenLogprobs | None, ...]] = {}
        for index, update, at_s in items:
            if update.error is not None:
                name = self._config.name
                logger.error(
                    "request %s: choice %d failed: %s", call.request_id, index, update.error
                )
                if update.batch_failed:
                    raise ReplicaUnavailable(name, update.error)
                raise GenerationFailed(name, update.error)
            self._observe(choices[index], update, arrived_s, at_s)
            texts.setdefault(index, []).append(update.delta)
            if update.logprobs:  # only calls that asked carry any
                logprobs.setdefault(index, []).extend(update.logprobs)
            if update.prompt_logprobs is not None:
                prompt_logprobs[index] = update.prompt_logprobs
            last[index] = update
        deltas = []
        for i, u in last.items():
            delta = ChoiceDelta(
                i,
                "".join(texts[i]),
                u.completion_tokens,
                u.finish_reason,
                logprobs=self._shown(logprobs[i]) if i in logprobs else (),
            )
            if call.echo and not choices[i].started:
                delta = self._echoed(call, prompts[i // call.n], delta, prompt_logprobs.get(i))
            choices[i].started = True
            deltas.append(delta)
        return tuple(deltas)

    def _echoed(
        self,
        call: GenerateCall,
        ids: list[int],
        delta: ChoiceDelta,
        logprobs: tuple[TokenLogprobs | None, ...] | None,
    ) -> ChoiceDelta:
        """A choice's first delta with its prompt: the text as sent (token ids decoded), and
        the prompt's logprobs when the call asked for logprobs."""
        prompt = call.prompts[delta.index // call.n]
        return dataclasses.replace(
            delta,
            prompt_text=prompt if isinstance(prompt, str) else self._decode(ids),
            prompt_logprobs=None if logprobs is None else self._shown_prompt(ids, logprobs),
        )

    def _decode(self, ids: list[int]) -> str:
        text = self._engine.tokenizer.decode(ids)
        if not isinstance(text, str):  # a list comes back only for a batch of sequences
            raise TypeError(f"decode of one sequence gave {type(text).__name__}, not str")
        return text

    def _shown(self, entries: list[TokenLogprobs]) -> tuple[TokenLogprob, ...]:
        """Token ids as the texts a client reads (``GenerationEngine.token_texts``)."""
        if not entries:
            return ()
        ids = [e.token_id for e in entries] + [t for e in entries for t in e.top_ids]
        names = dict(zip(ids, self._engine.token_texts(ids), strict=True))
        return tuple(
            TokenLogprob(
                names[e.token_id],
                e.logprob,
                tuple((names[t], v) for t, v in zip(e.top_ids, e.top_logprobs, strict=True)),
            )
            for e in entries
        )

    def _shown_prompt(
        self, ids: list[int], entries: tuple[TokenLogprobs | None, ...]
    ) -> tuple[TokenLogprob, ...]:
        """A prompt's logprobs: its first token has none (nothing comes before it)."""
        head = TokenLogprob(self._engine.token_texts(ids[:1])[0], None)
        return (head, *self._shown([e for e in entries[1:] if e is not None]))

    def _observe(
        self, choice: _Choice, update: SequenceUpdate, arrived_s: float, now: float
    ) -> None:
        new_tokens = update.completion_tokens - choice.tokens
        if new_tokens <= 0:
            return
        if choice.tokens == 0:
            self._stats.observe("ttft_seconds", now - arrived_s)
        else:
            self._stats.observe("itl_seconds", (now - choice.last_s) / new_tokens)
        self._stats.inc("tokens", new_tokens)
        choice.tokens, choice.last_s = update.completion_tokens, now

    async def _report_stats_every(self, period_s: float = STATS_PERIOD_S) -> None:
        """Keep the running/waiting/KV-cache gauges current (a cancelled sequence leaves the
        batch at the engine's next step, after its call has returned)."""
        while True:
            stats = self._engine.stats()
            self._stats.set("running", stats.running)
            self._stats.set("waiting", stats.waiting)
            if stats.kv_cache_use is not None:
                self._stats.set("kv_cache_use", stats.kv_cache_use)
            await asyncio.sleep(period_s)


def join_deltas(parts: list[ChoiceDelta]) -> ChoiceDelta:
    """One choice's deltas, in order, as one: texts and logprobs joined, the last count and
    finish reason, the first delta's echoed prompt."""
    first, last = parts[0], parts[-1]
    return ChoiceDelta(
        last.index,
        "".join(p.text for p in parts),
        last.completion_tokens,
        last.finish_reason,
        logprobs=tuple(lp for p in parts for lp in p.logprobs),
        prompt_text=first.prompt_text,
        prompt_logprobs=first.prompt_logprobs,
    )
