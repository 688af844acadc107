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
    inputs: tuple[str, ...]
    request_id: str
    deadline_s: float
    """Wall-clock time (``time.time()``) after which the answer is no use to the client."""
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EmbedReply:
    """What a model server returns for one call: rows in input order."""

    vectors: np.ndarray
    """(n, dim) float32, L2-normalised."""
    token_counts: tuple[int, ...]
    version: str
    """The model version that computed it."""


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
