"""The internal request every protocol adapter produces, and the reply model servers give."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.errors import ApiError, bad_request


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    """One client request after its protocol adapter: protocol-free from here on.

    InferenceRequest(model="minilm", inputs=("hello",), request_id="r-1", deadline_s=...)
    """

    model: str
    inputs: tuple[Any, ...]
    """Texts, or for tensor models one FP32 feature row (a 1-D numpy array) per input."""
    request_id: str
    deadline_s: float
    """Wall-clock time (``time.time()``) after which the answer is no use to the client."""
    parameters: Mapping[str, Any] = field(default_factory=dict)
    shard_key: str = ""
    """What a model sharded by header is placed by: ``X-Loom-Shard-Key``, else the request id."""


@dataclass(frozen=True, slots=True)
class EmbedReply:
    """What a model server returns for one call: rows in input order."""

    vectors: np.ndarray
    """(n, dim) float32, L2-normalised."""
    token_counts: tuple[int, ...]
    version: str
    """The model version that computed it."""


@dataclass(frozen=True, slots=True)
class ClassifyReply:
    """What a classifier's server returns for one call: rows in input order."""

    probabilities: np.ndarray
    """(n, classes) float32; column j is the model's label j (see its metadata)."""
    version: str
    """The model version that computed it."""

    def rows(self, start: int, stop: int) -> ClassifyReply:
        return ClassifyReply(probabilities=self.probabilities[start:stop], version=self.version)


def pack_inputs(inputs: list[Any]) -> np.ndarray | list[str]:
    """What one call to a classifier carries: feature rows stacked into one contiguous
    (n, features) array (one buffer over the hop, not n), texts as they are."""
    if inputs and isinstance(inputs[0], np.ndarray):
        return np.stack(inputs)
    return list(inputs)


def check_inputs(texts: tuple[str, ...], *, max_inputs: int, max_input_chars: int) -> None:
    """Empty -> 400; too many or too long -> 413 (the request is too large to serve)."""
    if not texts:
        raise bad_request("input must not be an empty list", param="input")
    if len(texts) > max_inputs:
        raise ApiError(
            413,
            f"{len(texts)} inputs exceed the limit of {max_inputs} per request",
            code="too_many_inputs",
            param="input",
        )
    for i, text in enumerate(texts):
        if not text:
            raise bad_request(f"input[{i}] is an empty string", param="input")
        if len(text) > max_input_chars:
            raise ApiError(
                413,
                f"input[{i}] has {len(text)} characters; the limit is {max_input_chars}",
                code="input_too_long",
                param="input",
            )
