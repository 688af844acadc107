"""Open Inference Protocol v2 transports (issue 17): the same ``digits`` classifier called with
JSON, with HTTP's binary tensor data extension and over gRPC, at 1, 64 and 256 rows a request,
8 closed-loop clients, one ``loom serve``, side by side in one run.

    python -m benchmarks.transports                    # full windows
    python -m benchmarks.transports --quick            # a smoke run
    python -m benchmarks.transports --rows 1,256 --transports json,binary

- json: ``POST /v2/models/digits/infer`` with the rows as a flat JSON number list, answered
  in JSON (what tritonclient sends with ``binary_data=False``);
- binary: the same route with the JSON header then the rows' raw little-endian FP32 bytes
  (``Inference-Header-Content-Length``), outputs asked in binary (``binary_data_output``),
  what ``tritonclient.http`` sends by default;
- grpc: ``inference.GRPCInferenceService/ModelInfer`` on ``server.grpc_port``, rows in
  ``raw_input_contents``, answers in ``raw_output_contents`` (``tritonclient.grpc``'s way).

Every body is encoded once before the run (the client then only writes bytes), so the figure
is the server's cost of each encoding. Each transport at each size gets a warm-up and a
measured window; the order goes round the transports at each size so they share the
machine's drift. Goal: binary >= 3x JSON rows/s at 256 rows. Writes
``benchmarks/results/transports-<time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.embeddings import _jsonable, finish_run, say, warn_if_busy
from benchmarks.loadgen import (
    LOCALHOST,
    NS_PER_S,
    LoadConfig,
    LoadResult,
    Recorder,
    drive_window,
    run_on_own_loop,
    run_requests,
)
from benchmarks.machine import machine_facts
from benchmarks.processes import ServerNotReady, ServerProcess, free_port
from benchmarks.report import percentile
from benchmarks.setups import stack_spec

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
MODEL = "digits"
FEATURES = 64
TRANSPORTS = ("json", "binary", "grpc")
GOAL_BINARY_OVER_JSON = 3.0
BODIES_PER_SIZE = 8
"""Distinct bodies per row count (different random rows), cycled through by the clients."""


@dataclass(frozen=True, kw_only=True)
class TransportBenchConfig:
    rows: tuple[int, ...] = (1, 64, 256)
    transports: tuple[str, ...] = TRANSPORTS
    concurrency: int = 8
    duration_s: float = 10.0
    warmup_s: float = 3.0
    ready_timeout_s: float = 300.0
    out_path: Path | None = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.rows or min(self.rows) < 1 or max(self.rows) > 256:
            raise ValueError("--rows: 1 to 256 rows a request (the model's max_inputs)")
        unknown = set(self.transports) - set(TRANSPORTS)
        if unknown or not self.transports:
            raise ValueError(f"--transports: some of {', '.join(TRANSPORTS)}; got {unknown}")
        if self.concurrency < 1 or self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError("--concurrency >= 1, --duration-s > 0, --warmup-s >= 0")


def parse_args(argv: Sequence[str] | None) -> TransportBenchConfig:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transports", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short windows")
    parser.add_argument("--rows", help="rows a request, e.g. 1,64,256")
    parser.add_argument("--transports", help=f"some of {','.join(TRANSPORTS)}")
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--duration-s", type=float)
    parser.add_argument("--warmup-s", type=float)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    quick = {"duration_s": 2.0, "warmup_s": 0.5, "rows": (1, 256)}
    settings: dict[str, Any] = dict(quick) if args.quick else {}
    if args.rows:
        settings["rows"] = tuple(int(r) for r in args.rows.split(",") if r.strip())
    if args.transports:
        settings["transports"] = tuple(t.strip() for t in args.transports.split(",") if t.strip())
    for name in ("concurrency", "duration_s", "warmup_s"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    settings["out_path"] = args.out
    try:
        return TransportBenchConfig(**settings)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # parser.error exits


# ---- bodies -------------------------------------------------------------------------------------


def json_body(rows: np.ndarray) -> bytes:
    body = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(rows.shape),
                "data": rows.reshape(-1).tolist(),
            }
        ]
    }
    return json.dumps(body).encode()


def binary_body(rows: np.ndarray) -> tuple[bytes, int]:
    """The JSON header, then the raw rows; and the header's length (the request's
    ``Inference-Header-Content-Length``)."""
    raw = rows.astype("<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(rows.shape),
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    head = json.dumps(header).encode()
    return head + raw, len(head)


def http_message(port: int, body: bytes, header_length: int | None) -> bytes:
    """A complete HTTP/1.1 POST to the model's v2 infer route."""
    path = f"/v2/models/{MODEL}/infer"
    lines = [f"POST {path} HTTP/1.1", f"Host: {LOCALHOST}:{port}"]
    if header_length is None:
        lines.append("Content-Type: application/json")
    else:
        lines += [
            "Content-Type: application/octet-stream",
            f"Inference-Header-Content-Length: {header_length}",
        ]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def sample_rows(count: int, rows: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed + rows)
    return [rng.random((rows, FEATURES), dtype=np.float32) * 16 for _ in range(count)]


# ---- gRPC ---------------------------------------------------------------------------------------


def grpc_requests(batches: Sequence[np.ndarray]) -> list[Any]:
    from serving.gateway.protocols import grpc_predict_v2_messages_pb2 as pb

    requests = []
    for rows in batches:
        request = pb.ModelInferRequest(model_name=MODEL)
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = "input", "FP32"
        tensor.shape.extend(rows.shape)
        request.raw_input_contents.append(rows.astype("<f4").tobytes())
        requests.append(request)
    return requests


async def _grpc_level(config: LoadConfig, requests: Sequence[Any]) -> LoadResult:
    import grpc

    from serving.gateway.protocols.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    now_ns = time.perf_counter_ns()
    start_ns = now_ns + int(config.warmup_s * NS_PER_S)
    end_ns = start_ns + int(config.duration_s * NS_PER_S)
    recorder = Recorder(capacity=config.max_requests, window_start_ns=start_ns,
                        window_end_ns=end_ns)  # fmt: skip
    # one channel per user, as the HTTP users each hold their own connection
    channels = [
        grpc.aio.insecure_channel(f"{LOCALHOST}:{config.port}") for _ in range(config.concurrency)
    ]

    async def user(offset: int, channel: grpc.aio.Channel) -> None:
        stub = GRPCInferenceServiceStub(channel)
        index = offset
        while True:
            begun = time.perf_counter_ns()
            if begun >= recorder.window_end_ns or recorder.full:
                return
            try:
                await stub.ModelInfer(requests[index % len(requests)], timeout=30)
            except grpc.aio.AioRpcError as exc:
                recorder.failure(time.perf_counter_ns(), f"grpc_{exc.code().name}")
            else:
                recorder.success(begun, time.perf_counter_ns())
            index += 1

    users = [asyncio.create_task(user(i, ch)) for i, ch in enumerate(channels)]
    try:
        cpu_s = await drive_window(users, window_start_ns=start_ns, window_end_ns=end_ns,
                                   drain_timeout_s=config.drain_timeout_s)  # fmt: skip
    finally:
        for channel in channels:
            await channel.close()
    return LoadResult(concurrency=config.concurrency, duration_s=config.duration_s,
                      loadgen_cpu_s=cpu_s, **recorder.results())  # fmt: skip


# ---- the run ------------------------------------------------------------------------------------


def register_digits(home: Path) -> None:
    """A digits MLP (random weights: only its speed matters) as ``MODEL``, its serving alias
    set, in the model store under ``home``."""
    import torch

    from models.engines.classify import save_family_model
    from models.families.digits import DigitsConfig, build_digits
    from models.settings import LoomEnv
    from models.store import ModelStore

    folder = home.parent / "digits-source"
    torch.manual_seed(0)
    config = DigitsConfig(arch="mlp", hidden=32)
    save_family_model(build_digits(config).eval(), config, folder)
    store = ModelStore(LoomEnv.from_environ({"LOOM_HOME": str(home)}).models_dir)
    store.register(MODEL, folder, task="classify")


def serving_config(http_port: int, grpc_port: int) -> dict[str, Any]:
    return {
        "server": {"host": LOCALHOST, "port": http_port, "grpc_port": grpc_port},
        "models": [
            {
                "name": MODEL,
                "source": MODEL,
                "task": "classify",
                "replicas": 1,
                "num_cpus": 1,
                "torch_threads": 1,
                "batching": {"max_batch_size": 256, "max_wait_ms": 2.0},
            }
        ],
    }


def level_record(transport: str, rows: int, result: LoadResult) -> dict[str, Any]:
    latencies = sorted(ns / 1e6 for ns in result.latencies_ns)
    rate = result.requests / result.duration_s
    return {
        "transport": transport,
        "rows": rows,
        "concurrency": result.concurrency,
        "requests_per_s": rate,
        "rows_per_s": rate * rows,
        "p50_ms": percentile(latencies, 50) if latencies else None,
        "p95_ms": percentile(latencies, 95) if latencies else None,
        "requests": result.requests,
        "errors": result.errors,
        "error_kinds": result.error_kinds,
        "loadgen_cpu_share": result.loadgen_cpu_s / result.duration_s,
    }


def measure(config: TransportBenchConfig, http_port: int, grpc_port: int) -> list[dict[str, Any]]:
    levels = []
    for rows in config.rows:
        batches = sample_rows(BODIES_PER_SIZE, rows, config.seed)
        messages = {
            "json": [http_message(http_port, json_body(b), None) for b in batches],
            "binary": [http_message(http_port, *binary_body(b)) for b in batches],
        }
        for transport in config.transports:
            port = grpc_port if transport == "grpc" else http_port
            load = LoadConfig(port=port, path=f"/v2/models/{MODEL}/infer",
                              concurrency=config.concurrency, warmup_s=config.warmup_s,
                              duration_s=config.duration_s)  # fmt: skip
            if transport == "grpc":
                result = run_on_own_loop(_grpc_level(load, grpc_requests(batches)))
            else:
                result = run_requests(load, messages[transport])
            level = level_record(transport, rows, result)
            say(
                f"{transport:<6} rows={rows:<4} c={config.concurrency}: "
                f"{level['requests_per_s']:8.1f} req/s {level['rows_per_s']:9.1f} rows/s "
                f"p50 {level['p50_ms'] or float('nan'):7.2f} ms  errors {level['errors']}"
            )
            levels.append(level)
    return levels


def ratios(levels: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rows/s of binary and gRPC over JSON at each size; the goal at the largest."""
    by = {(lv["transport"], lv["rows"]): lv["rows_per_s"] for lv in levels}
    out: dict[str, Any] = {}
    for rows in sorted({lv["rows"] for lv in levels}):
        base = by.get(("json", rows))
        for other in ("binary", "grpc"):
            value = by.get((other, rows))
            if base and value is not None:
                out[f"{other}_over_json_rows{rows}"] = value / base
    top = max((lv["rows"] for lv in levels), default=None)
    key = f"binary_over_json_rows{top}"
    out["goal"] = {"name": key, "value": out.get(key), "goal": GOAL_BINARY_OVER_JSON,
                   "met": (out.get(key) or 0) >= GOAL_BINARY_OVER_JSON}  # fmt: skip
    return out


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    now = dt.datetime.now(dt.UTC)
    out_path = config.out_path or RESULTS_DIR / f"transports-{now:%Y%m%dT%H%M%SZ}.json"
    work_dir = Path(tempfile.mkdtemp(prefix="loom-bench-v2-"))
    results: dict[str, Any] = {
        "benchmark": "transports",
        "config": _jsonable(config),
        "machine": machine_facts(REPO_ROOT),
    }
    warn_if_busy(results["machine"])
    started = time.monotonic()
    failed = True
    try:
        http_port, grpc_port = free_port(), free_port()
        config_path = work_dir / "stack.yaml"
        config_path.write_text(yaml.safe_dump(serving_config(http_port, grpc_port)))
        spec = stack_spec(work_dir=work_dir, config_path=config_path, model_name=MODEL,
                          extra_env={}, ready_timeout_s=config.ready_timeout_s)  # fmt: skip
        # the spec picked its own HTTP port; the config file's is overridden by --port
        register_digits(Path(spec.env["LOOM_HOME"]))
        server = ServerProcess(spec)
        say("stack: starting")
        with server:
            say(f"stack: ready in {server.ready_s:.1f} s")
            levels = measure(config, spec.port, grpc_port)
        results["levels"] = levels
        results["ratios"] = ratios(levels)
        results["error"] = None
        goal = results["ratios"]["goal"]
        say(f"{goal['name']}: {goal['value']} (goal >= {goal['goal']}: "
            f"{'met' if goal['met'] else 'MISSED'})")  # fmt: skip
        failed = any(lv["errors"] for lv in levels)
    except (ServerNotReady, RuntimeError, OSError) as exc:
        results["error"] = str(exc)
        say(f"FAILED: {exc}")
    finally:
        finish_run(results, out_path, work_dir, started=started, failed=failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
