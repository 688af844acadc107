"""OpenAI-compatible embeddings and model listing, and OpenAI's error shape.

Input is a string or a list of strings (token-id arrays are refused: the server tokenises);
``encoding_format`` is ``float`` (JSON numbers) or ``base64`` (little-endian float32 bytes, what
the OpenAI SDK asks for by default).

The answers are written with orjson from plain values (fast: numpy rows go straight in); the
models at the end (``EmbeddingsResponse``, ``ModelList``, ``OpenAIError``, ...) are their
shapes for the OpenAPI document (``routes.openapi``), checked against real answers by the
schema fuzz test.
"""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from serving.gateway.errors import bad_request
from serving.messages import EmbedReply


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1)
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _no_token_arrays(cls, value: object) -> object:
        if isinstance(value, list) and value and not isinstance(value[0], str):
            raise ValueError(
                "input must be a string or a list of strings (token arrays are not supported)"
            )
        return value

    def texts(self) -> tuple[str, ...]:
        return (self.input,) if isinstance(self.input, str) else tuple(self.input)


def embeddings_response(
    reply: EmbedReply, *, model: str, encoding_format: str, dimensions: int | None
) -> bytes:
    vectors = reply.vectors
    if dimensions is not None and dimensions != vectors.shape[1]:
        raise bad_request(
            f"dimensions={dimensions} is not supported by {model}; it gives {vectors.shape[1]}",
            param="dimensions",
        )
    if encoding_format == "base64":
        rows = [
            base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode()
            for v in vectors
        ]
    else:
        rows = list(vectors)  # float32 rows; orjson writes each number's shortest float32 form
    tokens = sum(reply.token_counts)
    body = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    # orjson with numpy rows: ~13 us per 384-float vector where json.dumps took ~400 us
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def model_card(name: str, created_s: int) -> dict:
    return {"id": name, "object": "model", "created": created_s, "owned_by": "loom"}


# ---- the answers' shapes (for the OpenAPI document) ---------------------------------------


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int = Field(ge=0)
    embedding: list[float] | str = Field(
        description="The vector: numbers, or base64 of little-endian float32 bytes."
    )


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class EmbeddingsResponse(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingsUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int = Field(description="When this gateway started, in seconds since the epoch.")
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class FieldProblem(BaseModel):
    field: str = Field(description="Dotted path into the request, e.g. hyperparameters.lr.")
    message: str


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="By status: invalid_request_error, not_found_error, ...")
    param: str | None = Field(description="The request field at fault, when one is.")
    code: str | None = Field(description="What went wrong, e.g. model_not_found.")
    fields: list[FieldProblem] | None = Field(
        None, description="Every field error of a refused job spec (422 only)."
    )


class OpenAIError(BaseModel):
    """Every 4xx and 5xx of an OpenAI-shaped route (``/v1/...``, ``/metrics``, ...)."""

    error: ErrorDetail
