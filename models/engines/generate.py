"""Text generation for causal language models: greedy or sampled, token by token.

This is the first slice of the generation engine (issue 3): one sequence at a time with a
KV cache, so greedy output equals ``model.generate(do_sample=False)`` token for token.
Continuous batching (new requests joining a running batch) comes next.

    engine = GenerationEngine(model_dir)
    engine.load(); engine.warmup()
    for delta in engine.stream("Once upon", SamplingParams(max_tokens=8, temperature=0)):
        print(delta, end="")
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.device import resolve_device, resolve_dtype
from models.loading import LoadedModel, load_pretrained


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_tokens: int = 16
    """Most new tokens to generate."""
    temperature: float = 1.0
    """0 means greedy (argmax); above 0 divides the logits before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    stop: tuple[str, ...] = ()
    """Generation ends before the first of these strings; it is not part of the text."""
    seed: int | None = None
    """Makes sampling repeatable."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    finish_reason: str
    """``stop`` (end-of-sequence token or a stop string) or ``length`` (max_tokens)."""


@dataclass
class _Decode:
    """The running state of one sequence."""

    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


def pick_next_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """The next token from the last position's logits (V,): argmax, or a top-p sample."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep tokens until the mass before them reaches top_p: [0.5, 0.3, 0.2] at 0.7 -> 2
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class GenerationEngine:
    """Generates from a transformers causal-LM folder (safetensors weights only)."""

    task = "generate"

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        num_threads: int | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self._num_threads = num_threads
        self._loaded: LoadedModel | None = None

    def load(self) -> None:
        if self._num_threads is not None:
            torch.set_num_threads(self._num_threads)
        self._loaded = load_pretrained(
            self.model_dir, task=self.task, device=self.device, dtype=self.dtype
        )

    def warmup(self) -> None:
        self.run([("Hello", SamplingParams(max_tokens=2, temperature=0))])

    @property
    def context_length(self) -> int:
        """Most tokens (prompt plus generated) the model can attend over."""
        config = self._require_loaded().model.config
        return int(getattr(config, "n_positions", None) or config.max_position_embeddings)

    def count_tokens(self, text: str) -> int:
        return len(self._require_loaded().tokenizer(text)["input_ids"])

    def run(self, batch: Sequence[tuple[str, SamplingParams]]) -> list[Generation]:
        """Generate for each (prompt, params) in turn; results in input order."""
        results = []
        for prompt, params in batch:
            state = _Decode()
            for _ in self._decode(prompt, params, state):
                pass
            results.append(self._result(prompt, state))
        return results

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[str]:
        """The generated text as it grows, one delta per new token (stop strings held back
        until they can be ruled out)."""
        state = _Decode()
        yield from self._decode(prompt, params, state)

    def _result(self, prompt: str, state: _Decode) -> Generation:
        return Generation(
            text=state.text,
            token_ids=tuple(state.generated),
            prompt_tokens=self.count_tokens(prompt),
            finish_reason=state.finish_reason or "length",
        )

    def _decode(self, prompt: str, params: SamplingParams, state: _Decode) -> Iterator[str]:
        loaded = self._require_loaded()
        tokenizer, model = loaded.tokenizer, loaded.model
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(self.device)
        if input_ids.shape[1] == 0:
            raise ValueError("the prompt is empty")
        if input_ids.shape[1] + params.max_tokens > self.context_length:
            raise ValueError(
                f"{input_ids.shape[1]} prompt tokens + max_tokens {params.max_tokens} exceed "
                f"the model's context of {self.context_length} tokens"
            )
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        eos = tokenizer.eos_token_id
        emitted = 0  # characters of state.text already yielded
        hold = max((len(s) for s in params.stop), default=1) - 1
        with torch.inference_mode():
            out = model(input_ids=input_ids, use_cache=True)
            for step in range(params.max_tokens):
                token = pick_next_token(out.logits[0, -1], params, generator)
                if token == eos:
                    state.finish_reason = "stop"
                    break
                state.generated.append(token)
                text = tokenizer.decode(state.generated, skip_special_tokens=True)
                text, stopped = cut_at_stop(text, params.stop)
                state.text = text
                if stopped:
                    state.finish_reason = "stop"
                    break
                # hold back the tail that could still be the start of a stop string
                safe = len(text) - hold if params.stop else len(text)
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
                if step + 1 < params.max_tokens:
                    next_ids = torch.tensor([[token]], device=self.device)
                    out = model(input_ids=next_ids, cache=out.past_key_values, use_cache=True)
        if len(state.text) > emitted:
            yield state.text[emitted:]

    def _require_loaded(self) -> LoadedModel:
        if self._loaded is None:
            raise RuntimeError("GenerationEngine.load() must be called first")
        return self._loaded
