"""The baseline: what a user would write instead of Loom. One FastAPI app under uvicorn, one
process, the same embedding engine, one request at a time, no batching.

The handler is ``async def`` and calls ``engine.run([text])`` directly: it blocks the event
loop for the forward pass, so requests run strictly one after another (the engine's
one-thread-at-a-time contract) with no thread hop per request. The answer has the OpenAI
embeddings shape, serialised once by ``JSONResponse``.

    python -m benchmarks.plain_server --port 8124
    curl -s 127.0.0.1:8124/v1/embeddings -d '{"model": "minilm", "input": "Hello there."}'
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from models.bundled import bundled_model_dir
from models.engines.embed import EmbeddingEngine, EmbedResult


@dataclass(frozen=True, kw_only=True)
class PlainServerConfig:
    """Where the plain server listens and how it builds its engine."""

    host: str = "127.0.0.1"
    port: int = 8001
    model_dir: Path | None = None
    """Model folder; ``None`` is the bundled MiniLM."""
    device: str = "auto"
    num_threads: int | None = None
    """torch intra-op threads; ``None`` leaves torch's default (one per core)."""


class EmbeddingRequest(BaseModel):
    model: str
    input: str | list[str]


def embeddings_body(result: EmbedResult, model_name: str) -> dict[str, Any]:
    """The OpenAI embeddings answer for one request (the Ray Serve baseline answers the same)."""
    tokens = sum(result.token_counts)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": vector}
            for i, vector in enumerate(result.vectors.tolist())
        ],
        "model": model_name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def build_app(engine: EmbeddingEngine, model_name: str = "minilm") -> FastAPI:
    """The app around a built (not yet loaded) engine; loading and warm-up run at startup."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.load()
        engine.warmup()
        yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}  # serving starts only after the lifespan loaded the engine

    @app.post("/v1/embeddings")
    async def embeddings(request: EmbeddingRequest) -> JSONResponse:
        texts = [request.input] if isinstance(request.input, str) else request.input
        result = engine.run(texts)  # blocks the loop on purpose: one request at a time
        return JSONResponse(embeddings_body(result, model_name))

    return app


def parse_args(argv: Sequence[str] | None) -> PlainServerConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-threads", type=int, default=None)
    args = parser.parse_args(argv)
    return PlainServerConfig(
        host=args.host,
        port=args.port,
        model_dir=args.model_dir,
        device=args.device,
        num_threads=args.num_threads,
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    engine = EmbeddingEngine(
        config.model_dir or bundled_model_dir(),
        device=config.device,
        num_threads=config.num_threads,
    )
    app = build_app(engine)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
