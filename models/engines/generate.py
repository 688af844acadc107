"""Text generation for causal language models, continuously batched.

The engine runs transformers' own continuous batching (``ContinuousBatchingManager``: a paged
KV cache and iteration-level scheduling on one background thread): a sequence that arrives
while others are decoding joins the very next step instead of waiting for the batch to end,
and a finished or cancelled sequence frees its slot at once. Loom adds per-sequence sampling
with its own seed (``SequenceSampler``), stop strings and incremental text (``TextStream``),
and a callback per sequence that receives each step's new text.

Logprobs, per sequence: ``SamplingParams.logprobs`` keeps each generated token's logprob and
top alternatives (taken in ``SequenceSampler``, from the row it draws from), and
``prompt_logprobs`` each prompt token's, computed in the prefill itself: as a batch is laid
out (``_PlanningProcessors``) the engine notes where each scored prompt's chunk sits among
the packed tokens, and a forward hook on the decoder applies the model's ``lm_head`` to those
positions' hidden states (transformers' batch keeps only each sequence's last position for
logits). ``max_tokens=0`` scores without generating: the prefill's one token is not shown.
Batches with no such sequence skip all of it.

Isolation: one sequence's fault (its sampling, its detokenising, its callback) ends that
sequence with an error update and nothing else; the batch and the loop go on. Should
transformers' loop die anyway, every sequence still held gets an error update at once, the
engine refuses new ones (``EngineStopped``), ``check`` raises, and the listeners given to
``on_stopped`` hear of it, so a server can stop routing to it without waiting for a poll.

Measured on 2 CPU cores, a 5M-parameter GPT-2, 32 prompts of 20 tokens x 64 new tokens:
sequential ``generate`` ~370 tokens/s, static batch of 32 ~3000, this manager ~2300 with every
request arriving at once (and, unlike the static batch, nobody waits for a batch to form or to
drain). Greedy output equals ``generate(do_sample=False)`` token for token (tested).

    engine = GenerationEngine(model_dir, max_sequences=32)
    engine.load(); engine.warmup()
    seq_id = engine.submit("Once upon", SamplingParams(max_tokens=8), on_update=print)
    engine.cancel(seq_id)   # frees its slot; no more updates
    engine.close()
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    GenerationMixin,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
)
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.continuous_batching.continuous_api import (
    BackgroundThreadStatus,
    ContinuousBatchingManager,
    OutputRouter,
)
from transformers.generation.continuous_batching.requests import (
    FutureRequestState,
    GenerationOutput,
)

from models.engines.base import PretrainedEngine
from models.engines.detokenize import TextStream, cut_at_stop
from models.engines.sampling import (
    MAX_LOGPROBS,
    MIN_SAMPLING_TEMPERATURE,
    SEED_MAX,
    SEED_MIN,
    SamplingParams,
    SequenceSampler,
    TokenLogprobs,
    pick_next_token,
    sample_seed,
)
from models.engines.varlen_attention import VARLEN_ATTENTION, register_varlen_attention

__all__ = [
    "MAX_LOGPROBS",
    "MIN_SAMPLING_TEMPERATURE",
    "SEED_MAX",
    "SEED_MIN",
    "EngineStats",
    "EngineStopped",
    "Generation",
    "GenerationEngine",
    "PromptError",
    "SamplingParams",
    "SequenceUpdate",
    "TokenLogprobs",
    "cut_at_stop",
    "pick_next_token",
    "sample_seed",
]

logger = logging.getLogger(__name__)

KV_PAGE_TOKENS = 64
"""Tokens per page of the paged KV cache: small pages waste little on short sequences."""


class PromptError(ValueError):
    """The prompt cannot be generated from: empty, too long for the model's context, or
    holding token ids outside the model's vocabulary."""


class EngineStopped(RuntimeError):
    """The generation loop has stopped (it failed, or the engine was closed): the engine
    takes no more sequences."""


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    finish_reason: str
    """``stop`` (end-of-sequence token or a stop string), ``length`` (max_tokens), or
    ``error`` (see ``error``)."""
    error: str | None = None
    """Why the sequence failed, when it did."""
    logprobs: tuple[TokenLogprobs, ...] = ()
    """One per generated token, when ``SamplingParams.logprobs`` asked for them."""
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None
    """One per prompt token (the first None), when ``SamplingParams.prompt_logprobs`` asked."""


@dataclass(frozen=True, slots=True)
class SequenceUpdate:
    """What one decoding step produced for one sequence."""

    seq_id: str
    delta: str
    """New text, safe to show (may be empty while a possible stop string is held back)."""
    completion_tokens: int
    """Tokens generated so far (the end-of-sequence token not counted)."""
    finish_reason: str | None = None
    """None while running; ``stop`` or ``length`` on the last update."""
    error: str | None = None
    """Set on the last update when generation failed."""
    batch_failed: bool = False
    """With ``error``: the failure ended the engine's loop, so every sequence failed with it
    (not this sequence's own fault); the engine takes no more."""
    token_ids: tuple[int, ...] = ()
    """On the last update: every generated token (the end-of-sequence token not counted)."""
    logprobs: tuple[TokenLogprobs, ...] = ()
    """With ``SamplingParams.logprobs``: the logprobs of the tokens generated since the
    previous update (``completion_tokens`` of them in all, over the updates, plus the
    end-of-sequence token's when that ended the sequence)."""
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None
    """With ``SamplingParams.prompt_logprobs``, on the sequence's first update: one per prompt
    token, the first None (nothing comes before it)."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int
    """Sequences in the batch now (prefilling or decoding)."""
    waiting: int
    """Sequences admitted but not yet in the batch."""
    kv_cache_use: float | None = None
    """Share of the KV cache's tokens the running sequences hold (0..1); None unknown."""


@dataclass
class _Scoring:
    """A sequence's prompt logprobs, filled by the prefill steps that process its prompt."""

    prompt: list[int]
    top: int
    """Alternatives per position."""
    found: list[TokenLogprobs | None]
    """Index p: prompt[p]'s logprob given prompt[:p]; [0] stays None."""
    failure: str | None = None

    def result(self) -> tuple[TokenLogprobs | None, ...]:
        """Every position's logprobs; ``RuntimeError`` if a prefill step did not report some
        (a forward the hook could not see, see ``GenerationEngine._score_prompts``)."""
        if self.failure is not None:
            raise RuntimeError(self.failure)
        missing = sum(entry is None for entry in self.found[1:])
        if missing:
            raise RuntimeError(f"prompt logprobs: {missing} positions were not computed")
        return tuple(self.found)


@dataclass(frozen=True, slots=True)
class _Span:
    """Where one scored prompt's chunk sits in a batch: rows ``row`` on, positions
    ``past`` to ``past + length``."""

    scoring: _Scoring
    row: int
    past: int
    length: int


@dataclass
class _Sequence:
    seq_id: str
    params: SamplingParams
    text: TextStream
    slot: int
    on_update: Callable[[SequenceUpdate], None]
    eos_ids: frozenset[int]
    scoring: _Scoring | None = None
    logprobs_sent: int = 0
    """Generated tokens whose logprobs went out in an update."""


class _PlanningProcessors(ContinuousBatchingLogitsProcessorList):
    """The batch's logits processors, plus a look at each batch as it is laid out: the
    engine learns there which rows of the coming forward hold the prompts it scores."""

    def __init__(
        self,
        processors: LogitsProcessorList,
        on_batch: Callable[[list[FutureRequestState]], None],
    ) -> None:
        super().__init__(processors, per_request_processors=True)
        self._on_batch = on_batch

    def prepare_tensor_args(
        self, requests_in_batch: list[FutureRequestState], arg_storage: torch.Tensor
    ) -> torch.Tensor:
        self._on_batch(requests_in_batch)
        return super().prepare_tensor_args(requests_in_batch, arg_storage)


class _DirectRouter(OutputRouter):
    """Hands each step's outputs to the engine on the generation thread, in one call."""

    def __init__(self, deliver: Callable[[list[GenerationOutput]], None]) -> None:
        super().__init__()
        self._deliver_all = deliver

    def deliver(self, output: GenerationOutput) -> None:
        self._deliver_all([output])

    def deliver_batch(self, outputs: list[GenerationOutput]) -> None:
        self._deliver_all(outputs)


def _require_one_cache_device(devices: Sequence[torch.device]) -> None:
    """Refuse stages on different devices: transformers' continuous batching keeps its paged
    KV cache as one tensor on ``model.device`` (``PagedAttentionCache.cache_tensor``, 5.24), so
    a layer on another device would write its keys and values across devices each step."""
    if len(set(devices)) > 1:
        raise ValueError(
            f"the generation engine cannot split a model across different devices "
            f"{[str(d) for d in devices]}: transformers' continuous batching keeps the whole "
            f"KV cache on one device; use one device (repeated stages on it are allowed)"
        )


def _start_daemon(manager: ContinuousBatchingManager, on_exit: Callable[[], None]) -> None:
    """``manager.start()``, but on a daemon thread: the manager's own thread is not one, so a
    process that forgot ``close()`` would hang at exit waiting for it. ``on_exit`` runs on
    that thread once the loop has ended, however it ended."""
    manager.background_thread_status.clear()

    def run() -> None:
        try:
            manager._run_generation_loop(use_inference_mode=True)
        finally:
            on_exit()

    thread = threading.Thread(target=run, name="loom-generation", daemon=True)
    # transformers declares the attribute as None only (its __init__ sets None, start() a thread)
    manager._generation_thread = thread  # type: ignore[assignment]
    thread.start()


class GenerationEngine(PretrainedEngine):
    """Generates from a transformers causal-LM folder (safetensors weights only)."""

    task = "generate"

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        num_threads: int | None = None,
        max_sequences: int = 32,
        max_batch_tokens: int = 1024,
        kv_cache_tokens: int | None = None,
        devices: Sequence[str] | None = None,
    ) -> None:
        """``max_sequences``: most sequences decoding together; ``max_batch_tokens``: most
        tokens in one step (prefill chunks plus one per decoding sequence);
        ``kv_cache_tokens``: KV cache size (default: room for max_sequences full contexts);
        ``devices``: pipeline stages on one device repeated (``["cpu", "cpu"]``) only, see
        ``_require_one_cache_device``."""
        super().__init__(
            model_dir, device=device, dtype=dtype, num_threads=num_threads, devices=devices
        )
        _require_one_cache_device(self.devices)
        self.max_sequences = max_sequences
        self._max_batch_tokens = max(max_batch_tokens, max_sequences)
        self._kv_cache_tokens = kv_cache_tokens
        self._manager: ContinuousBatchingManager | None = None
        self._sampler = SequenceSampler()
        self._sequences: dict[str, _Sequence] = {}
        self._scoring: dict[str, _Scoring] = {}
        """Sequences whose prompt logprobs are being computed (until their first token)."""
        self._plan: list[_Span] | None = None
        """The scored prompts in the batch laid out last, for the forward that follows."""
        self._lm_head: torch.nn.Module | None = None
        self._token_texts: dict[int, str] = {}
        self._lock = threading.Lock()
        self._vocab_size = 0  # set by load()
        self._stopped: str | None = None
        """Why the loop ended (under ``_lock``); None while it runs."""
        self._loop_error: str | None = None
        """The error the dying loop fails its sequences with, as soon as the first hears."""
        self._closing = False
        self._stop_listeners: list[Callable[[str], None]] = []

    # ---- lifecycle ------------------------------------------------------------------

    def load(self) -> None:
        self._loaded = self._load_pretrained()
        model, tokenizer = self._loaded.model, self._loaded.tokenizer
        if not isinstance(model, GenerationMixin):  # every *ForCausalLM class is one
            raise TypeError(f"{type(model).__name__} in {self.model_dir} cannot generate")
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1
        cache_tokens = self._cache_tokens
        manager = model.init_continuous_batching(
            # transformers leaves GenerationConfig.__init__(**kwargs) unannotated
            generation_config=GenerationConfig(  # type: ignore[no-untyped-call]
                do_sample=False,  # sampled rows are drawn by SequenceSampler, per sequence
                max_new_tokens=16,
                eos_token_id=eos,
                pad_token_id=eos if eos >= 0 else 0,
            ),
            continuous_batching_config=ContinuousBatchingConfig(
                page_size=KV_PAGE_TOKENS,
                num_blocks=math.ceil(cache_tokens / KV_PAGE_TOKENS),
                max_batch_tokens=self._max_batch_tokens,
                max_requests_per_batch=self.max_sequences,
                per_request_processors=True,
                allow_block_sharing=False,  # prompts rarely share prefixes; keeps pages simple
                # no CUDA graphs: the per-sequence sampler and the prompt-logprobs hook decide
                # in Python at every step (which rows to draw, which positions to score), and
                # a captured graph would replay one step's decisions for all (on a CPU there
                # are no graphs anyway)
                use_cuda_graph=False,
            ),
        )
        if self.device.type == "cpu" and model.config._attn_implementation == "sdpa":
            # one attention call per sequence instead of one masked call over the whole batch
            # (varlen_attention.py): 32 sequences of a 10M GPT-2 on 2 CPU cores, ~860 -> ~1160
            # tokens/s
            register_varlen_attention()
            model.set_attn_implementation(VARLEN_ATTENTION)
        # our sampler takes the logits-processor slot; one int32 argument row (the slot)
        processors = _PlanningProcessors(LogitsProcessorList([self._sampler]), self._plan_batch)
        processors.tensors_required = 1
        manager.logit_processor = processors
        # prompt logprobs: the decoder's hidden states for every position of a scored prompt
        self._lm_head = model.get_output_embeddings()  # type: ignore[no-untyped-call]
        model.base_model.register_forward_hook(self._score_prompts, with_kwargs=True)
        manager.output_router = _DirectRouter(self._on_outputs)
        self._manager = manager
        self._vocab_size = int(model.config.vocab_size)  # rows of the embedding table
        _start_daemon(manager, self._on_loop_exit)

    def warmup(self) -> None:
        self.run(
            [
                ("Hello", SamplingParams(max_tokens=2, temperature=0)),
                ("Hello", SamplingParams(max_tokens=2, temperature=1.0, seed=0)),
            ]
        )

    def close(self) -> None:
        self._closing = True  # the loop's end is asked for: no listener hears of it
        manager, self._manager = self._manager, None
        if manager is not None:
            manager.stop(block=True, timeout=10)

    def check(self) -> None:
        """Raise ``EngineStopped`` if the generation loop has ended (a health check); true
        from the moment it ends, not from some later poll."""
        manager = self._require_manager()
        reason = self._stopped or self._loop_error or manager.background_thread_status.fatal_error
        if reason is not None or self._loop_failing() or not manager.is_running():
            raise EngineStopped(f"the generation loop has stopped: {reason or 'not running'}")

    def on_stopped(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(reason)`` once, on the generation thread, if the loop ends without
        ``close()`` (it failed); at once if it already has. Keep it short and thread-safe."""
        with self._lock:
            stopped = self._stopped
            if stopped is None:
                self._stop_listeners.append(listener)
        if stopped is not None and not self._closing:
            listener(stopped)

    # ---- what the model allows ------------------------------------------------------

    @property
    def _cache_tokens(self) -> int:
        """The KV cache's size in tokens (default: room for max_sequences full contexts)."""
        return self._kv_cache_tokens or self.max_sequences * self.context_length

    @property
    def context_length(self) -> int:
        """Most tokens (prompt plus generated) the model can attend over."""
        config = self._require_loaded().model.config
        return int(getattr(config, "n_positions", None) or config.max_position_embeddings)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._require_loaded().tokenizer

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def encode_prompt(self, prompt: str, params: SamplingParams) -> list[int]:
        """The prompt's token ids; ``PromptError`` if it is empty or leaves no room for
        ``max_tokens`` in the context."""
        ids: list[int] = self.tokenizer(prompt)["input_ids"]
        self.check_prompt_ids(ids, params)
        return ids

    def check_prompt_ids(self, ids: Sequence[int], params: SamplingParams) -> None:
        """``PromptError`` unless ``ids`` can be generated from: not empty, every id in the
        vocabulary, room for ``max_tokens`` in the context. Checked before a sequence joins
        the batch: an id past the embedding table would fail the step of every sequence."""
        if not ids:
            raise PromptError("the prompt is empty")
        vocab = self._vocab_size
        if any(not (isinstance(i, int) and 0 <= i < vocab) for i in ids):
            raise PromptError(
                f"the prompt holds token ids outside the vocabulary (0 to {vocab - 1})"
            )
        # max_tokens 0 (prompt scoring) still runs the one step that ends the prefill
        if len(ids) + max(1, params.max_tokens) > self.context_length:
            raise PromptError(
                f"{len(ids)} prompt tokens + max_tokens {params.max_tokens} exceed "
                f"the model's context of {self.context_length} tokens"
            )

    # ---- sequences ------------------------------------------------------------------

    def submit(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        *,
        on_update: Callable[[SequenceUpdate], None],
    ) -> str:
        """Start one sequence; returns its id. ``on_update`` is called on the generation
        thread after each step that produced text, and once more with the finish reason or
        the error (keep it short: hand the update to your own thread or event loop; should
        it raise, its sequence is cancelled). ``PromptError`` for a prompt that cannot be
        generated from, ``EngineStopped`` once the loop has ended."""
        manager = self._require_manager()
        if isinstance(prompt, str):
            ids = self.encode_prompt(prompt, params)
        else:
            ids = list(prompt)
            self.check_prompt_ids(ids, params)
        seq_id = uuid.uuid4().hex
        eos = self.tokenizer.eos_token_id
        eos_ids = frozenset() if params.ignore_eos or eos is None else frozenset({eos})
        slot = self._sampler.add(params, self.device)
        scoring = None
        if params.prompt_logprobs is not None:
            scoring = _Scoring(ids, params.prompt_logprobs, [None] * len(ids))
        seq = _Sequence(
            seq_id,
            params,
            TextStream(self.tokenizer, params.stop),
            slot,
            on_update,
            eos_ids,
            scoring,
        )
        with self._lock:  # the loop's end takes this lock too: a sequence is failed or refused
            stopped = self._stopped
            if stopped is None:
                self._sequences[seq_id] = seq
                if scoring is not None:
                    self._scoring[seq_id] = scoring
        if stopped is not None:
            self._sampler.remove(slot)
            raise EngineStopped(f"the generation loop has stopped: {stopped}")
        try:
            manager.add_request(
                ids,
                request_id=seq_id,
                max_new_tokens=max(1, params.max_tokens),  # 0: the prefill's token, unshown
                streaming=True,
                eos_token_id=-1 if not eos_ids else eos,
                loom_slot=slot,
            )
        except BaseException:
            self.cancel(seq_id)
            raise
        return seq_id

    def cancel(self, seq_id: str) -> None:
        """Stop a sequence and free its slot; it gets no more updates."""
        with self._lock:
            seq = self._sequences.pop(seq_id, None)
            self._scoring.pop(seq_id, None)
        if seq is None:
            return
        self._sampler.remove(seq.slot)
        if self._manager is not None:
            self._manager.cancel_request(seq_id)

    def stats(self) -> EngineStats:
        manager = self._manager
        processor = getattr(manager, "batch_processor", None)
        if manager is None or processor is None:
            return EngineStats(running=0, waiting=0)
        scheduler = processor.scheduler
        waiting = len(scheduler.waiting_requests) + manager.input_queue.qsize()
        active = list(scheduler.active_requests.values())  # a copy: the loop thread edits it
        # pages are KV_PAGE_TOKENS long: a sequence of 70 tokens holds 3 pages of 32 = 96
        pages = sum(math.ceil(state.current_len() / KV_PAGE_TOKENS) for state in active)
        pages_total = math.ceil(self._cache_tokens / KV_PAGE_TOKENS)
        return EngineStats(
            running=len(active), waiting=waiting, kv_cache_use=min(1.0, pages / pages_total)
        )

    def run(self, batch: Sequence[tuple[str, SamplingParams]]) -> list[Generation]:
        """Generate for each (prompt, params), all in one continuous batch; input order kept."""
        results: list[Generation | None] = [None] * len(batch)
        done = threading.Semaphore(0)
        prompts = [self.encode_prompt(prompt, params) for prompt, params in batch]

        def collector(i: int, prompt_tokens: int) -> Callable[[SequenceUpdate], None]:
            parts: list[str] = []
            logprobs: list[TokenLogprobs] = []
            prompt_logprobs: list[tuple[TokenLogprobs | None, ...] | None] = [None]

            def collect(update: SequenceUpdate) -> None:
                parts.append(update.delta)
                logprobs.extend(update.logprobs)
                if update.prompt_logprobs is not None:
                    prompt_logprobs[0] = update.prompt_logprobs
                if update.finished:
                    results[i] = Generation(
                        text="".join(parts),
                        token_ids=update.token_ids,
                        prompt_tokens=prompt_tokens,
                        finish_reason=update.finish_reason or "error",
                        error=update.error,
                        logprobs=tuple(logprobs),
                        prompt_logprobs=prompt_logprobs[0],
                    )
                    done.release()

            return collect

        for i, (ids, (_, params)) in enumerate(zip(prompts, batch, strict=True)):
            self.submit(ids, params, on_update=collector(i, len(ids)))
        for _ in batch:
            done.acquire()
        return [r for r in results if r is not None]

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[str]:
        """The generated text as it grows, one delta per step that produced text."""
        updates: queue.SimpleQueue[SequenceUpdate] = queue.SimpleQueue()
        seq_id = self.submit(prompt, params, on_update=updates.put)
        try:
            while True:
                update = updates.get()
                if update.error is not None:
                    raise RuntimeError(update.error)
                if update.delta:
                    yield update.delta
                if update.finished:
                    return
        finally:
            self.cancel(seq_id)

    # ---- the generation thread ------------------------------------------------------

    def _on_outputs(self, outputs: list[GenerationOutput]) -> None:
        """Each output to its sequence, one at a time: whatever one sequence's update raises
        (detokenising, its callback) ends that sequence, never this step of the loop."""
        for output in outputs:
            with self._lock:
                seq = self._sequences.get(output.request_id)
            if seq is None:
                continue  # cancelled meanwhile
            try:
                update = self._with_logprobs(
                    seq, self._advance(seq, output), len(output.generated_tokens)
                )
            except Exception as exc:
                logger.warning("sequence %s failed: %r", seq.seq_id, exc, exc_info=True)
                update = SequenceUpdate(seq.seq_id, "", 0, error=f"generation failed: {exc}")
            if update.finished:
                self._end(seq, cancel=not output.is_finished())
            if update.delta or update.finished or update.prompt_logprobs is not None:
                self._notify(seq, update)

    def _notify(self, seq: _Sequence, update: SequenceUpdate) -> None:
        """Hand ``update`` to its sequence's callback; one that raises loses its sequence."""
        try:
            seq.on_update(update)
        except Exception:
            logger.exception("sequence %s: its update callback raised; cancelling it", seq.seq_id)
            self.cancel(seq.seq_id)

    def _end(self, seq: _Sequence, *, cancel: bool) -> None:
        """Forget a finished or failed sequence; ``cancel``: it still runs in the batch."""
        with self._lock:
            self._sequences.pop(seq.seq_id, None)
        self._sampler.remove(seq.slot)
        if cancel and self._manager is not None:
            self._manager.cancel_request(seq.seq_id)

    def _advance(self, seq: _Sequence, output: GenerationOutput) -> SequenceUpdate:
        if output.error is not None:
            batch_failed = self._loop_failing()
            if batch_failed and self._loop_error is None:
                self._loop_error = str(output.error)  # check() says why from now on
            return SequenceUpdate(
                seq.seq_id, "", 0, error=str(output.error), batch_failed=batch_failed
            )
        failure = self._sampler.failure(seq.slot)
        if failure is not None:  # this sequence's own sampling failed; the batch went on
            return SequenceUpdate(seq.seq_id, "", len(output.generated_tokens), error=failure)
        prompt_logprobs = None
        if seq.scoring is not None and output.generated_tokens:  # the prefill has ended
            with self._lock:
                self._scoring.pop(seq.seq_id, None)
            scoring, seq.scoring = seq.scoring, None
            prompt_logprobs = scoring.result()  # or RuntimeError: this sequence fails
        if seq.params.max_tokens == 0:  # prompt scoring only: the prefill's token is not shown
            return SequenceUpdate(
                seq.seq_id, "", 0, finish_reason="length", prompt_logprobs=prompt_logprobs
            )
        tokens = output.generated_tokens
        ended_on_eos = bool(tokens) and tokens[-1] in seq.eos_ids and output.is_finished()
        if ended_on_eos:
            tokens = tokens[:-1]
        finished = output.is_finished()
        if prompt_logprobs is not None:  # said on the first update, whatever it holds
            update = self._advance_text(seq, tokens, finished, ended_on_eos)
            return dataclasses.replace(update, prompt_logprobs=prompt_logprobs)
        return self._advance_text(seq, tokens, finished, ended_on_eos)

    def _advance_text(
        self, seq: _Sequence, tokens: list[int], finished: bool, ended_on_eos: bool
    ) -> SequenceUpdate:
        delta = seq.text.push(tokens, final=finished)
        if seq.text.stopped:  # a stop string: _on_outputs cancels the rest of it
            return SequenceUpdate(
                seq.seq_id, delta, len(tokens), finish_reason="stop", token_ids=tuple(tokens)
            )
        if finished:
            reason = "stop" if ended_on_eos else "length"
            return SequenceUpdate(
                seq.seq_id, delta, len(tokens), finish_reason=reason, token_ids=tuple(tokens)
            )
        return SequenceUpdate(seq.seq_id, delta, len(tokens))

    def _with_logprobs(
        self, seq: _Sequence, update: SequenceUpdate, generated: int
    ) -> SequenceUpdate:
        """The update, holding the logprobs of the tokens generated since the last update
        that went out (one that goes out: it has text, or it ends the sequence). The last
        one also holds the end-of-sequence token's, when that ended it (as vLLM answers:
        lm-evaluation-harness reads an echoed ``max_tokens: 1`` answer as the prompt's
        logprobs plus exactly one generated token's)."""
        if seq.params.logprobs is None or update.error is not None:
            return update
        if not (update.delta or update.finished or update.prompt_logprobs is not None):
            return update
        # max_tokens 0 shows no generated token, not even the prefill's EOS
        ended = update.finished and seq.params.max_tokens > 0
        count = generated if ended else update.completion_tokens
        logprobs = self._sampler.logprobs(seq.slot, seq.logprobs_sent, count)
        seq.logprobs_sent = count
        return dataclasses.replace(update, logprobs=logprobs)

    # ---- prompt logprobs (on the generation thread) ---------------------------------

    def _plan_batch(self, requests_in_batch: list[FutureRequestState]) -> None:
        """Called as each batch is laid out: note where the scored prompts' chunks sit (rows
        are the batch's tokens, request after request) for the forward that follows."""
        if not self._scoring:
            self._plan = None
            return
        spans, row = [], 0
        for future in requests_in_batch:
            length = future.query_length
            scoring = self._scoring.get(future.state.request_id)
            # position_offset has already moved past this chunk
            past = future.state.position_offset - length
            if scoring is not None and past < len(scoring.prompt) - 1:
                spans.append(_Span(scoring, row, past, length))
            row += length
        self._plan = spans or None

    def _score_prompts(
        self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any
    ) -> None:
        """A forward hook on the decoder: the logprob of each scored prompt token given the
        ones before it, from the hidden states of the positions before it (the model's own
        ``lm_head``, float32, log-softmax). Never raises: a failure fails the scored
        sequences of this batch alone (``_Scoring.failure``)."""
        plan, self._plan = self._plan, None
        if plan is None:
            return
        try:
            self._score(plan, output, kwargs.get("input_ids"))
        except Exception as exc:
            logger.warning("prompt logprobs failed for %d prompts: %r", len(plan), exc)
            for span in plan:
                span.scoring.failure = f"prompt logprobs failed: {exc}"

    @torch.inference_mode()
    def _score(self, plan: list[_Span], output: Any, input_ids: torch.Tensor | None) -> None:
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        rows: list[int] = []
        targets: list[int] = []
        places: list[tuple[_Scoring, int]] = []
        for span in plan:
            prompt = span.scoring.prompt
            end = min(span.past + span.length, len(prompt))
            # the batch must be the one planned: its tokens are this prompt's chunk
            if input_ids is not None:
                seen = input_ids[0, span.row : span.row + end - span.past].tolist()
                if seen != prompt[span.past : end]:
                    raise RuntimeError("the batch's tokens are not the planned prompt chunk")
            for position in range(span.past, min(end, len(prompt) - 1)):
                rows.append(span.row + position - span.past)
                targets.append(prompt[position + 1])
                places.append((span.scoring, position + 1))
        if not rows or self._lm_head is None:
            return
        logits = self._lm_head(hidden[0, rows]).float()
        logps = torch.log_softmax(logits, dim=-1)
        chosen = logps.gather(1, torch.tensor(targets, device=logps.device)[:, None])
        k = max(span.scoring.top for span in plan)
        values, ids = torch.topk(logps, k, dim=-1) if k else (logps[:, :0], logps[:, :0].long())
        chosen_list, values_list, ids_list = chosen[:, 0].tolist(), values.tolist(), ids.tolist()
        for i, (scoring, position) in enumerate(places):
            n = scoring.top
            scoring.found[position] = TokenLogprobs(
                targets[i], chosen_list[i], tuple(ids_list[i][:n]), tuple(values_list[i][:n])
            )

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's own text (``decode([id])``, remembered): what logprobs are shown
        with. A token that is part of a multi-byte character shows as \ufffd."""
        cache = self._token_texts
        missing = [t for t in dict.fromkeys(token_ids) if t not in cache]
        if missing:
            decoded = self.tokenizer.batch_decode([[t] for t in missing])
            for token, text in zip(missing, decoded, strict=True):
                cache[token] = text
        return [cache[t] for t in token_ids]

    def _loop_failing(self) -> bool:
        """transformers fails every sequence with the same error when its loop dies: it asks
        for a hard stop first, then fails them, then records the error."""
        manager = self._manager
        if manager is None:
            return True
        status = manager.background_thread_status
        return (
            status.fatal_error is not None
            or status.local_status >= BackgroundThreadStatus.HARD_STOP
        )

    def _on_loop_exit(self) -> None:
        """On the generation thread, once the loop has ended: fail every sequence still held
        (one that arrived as the loop died was never failed by transformers: it would hang),
        refuse new ones, and tell the listeners unless the engine is being closed."""
        manager = self._manager
        error = manager.background_thread_status.fatal_error if manager is not None else None
        reason = str(error) if error is not None else "the engine was closed"
        with self._lock:
            self._stopped = reason
            held = list(self._sequences.values())
            self._sequences.clear()
            listeners, self._stop_listeners = self._stop_listeners, []
        if error is not None:
            logger.error("the generation loop died (%r): failing %d sequences", error, len(held))
        for seq in held:
            self._sampler.remove(seq.slot)
            update = SequenceUpdate(
                seq.seq_id, "", 0, error=f"the generation loop stopped: {reason}", batch_failed=True
            )
            self._notify(seq, update)
        if self._closing:
            return
        for listener in listeners:
            try:
                listener(reason)
            except Exception:
                logger.exception("a listener of the generation loop's end raised")

    def _require_manager(self) -> ContinuousBatchingManager:
        if self._manager is None:
            raise RuntimeError("GenerationEngine.load() must be called first")
        return self._manager
