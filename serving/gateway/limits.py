"""Per-request size limits on texts (``limits`` of a model entry), checked before any hop.

One rule for embeddings, v2 texts and completion prompts: an empty list or an empty text is
400; more texts than ``max_inputs``, or a text longer than ``max_input_chars``, is 413 (the
request is too large to serve), the message naming which one.

    check_texts(("hello",), limits)                                  # inputs: input[0] ...
    check_texts(prompts, limits, field="prompt", plural="prompts", name_one=True)
"""

from __future__ import annotations

from collections.abc import Sequence

from serving.config.sections import LimitsConfig
from serving.gateway.errors import ApiError, bad_request


def check_texts(
    texts: Sequence[str | Sequence[int]],
    limits: LimitsConfig,
    *,
    field: str = "input",
    plural: str = "inputs",
    name_one: bool = False,
) -> None:
    """Empty -> 400; too many or too long -> 413. ``name_one``: a lone text is called
    ``field`` in messages (``prompt is an empty string``), not ``field[0]``."""
    if not texts:
        raise bad_request(f"{field} must not be an empty list", param=field)
    if len(texts) > limits.max_inputs:
        raise ApiError(
            413,
            f"{len(texts)} {plural} exceed the limit of {limits.max_inputs} per request",
            code="too_many_inputs",
            param=field,
        )
    for i, text in enumerate(texts):
        where = field if name_one and len(texts) == 1 else f"{field}[{i}]"
        if not text:
            raise bad_request(f"{where} is an empty string", param=field)
        # token ids count as characters: each token is at least one
        unit = "characters" if isinstance(text, str) else "token ids"
        if len(text) > limits.max_input_chars:
            raise ApiError(
                413,
                f"{where} has {len(text)} {unit}; the limit is {limits.max_input_chars}",
                code="input_too_long",
                param=field,
            )
