"""Scatter/gather ensembles through the real gateway on one local Ray: three trained digits
members, one made slow, one failing and one straggling now and then (config ``faults``), and
ensembles over them. The deadline holds with a slow member (a partial answer, flagged), a
failing member keeps or breaks the quorum, hedging cuts a straggler's timeouts, and the
ensemble is at least as accurate as its best member on the validation split."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from serving_stack import without_wait_budget

from models.settings import LoomEnv
from models.store import ModelStore
from serving.config import parse_config
from serving.server import LoomServer
from training.spec import DigitsHyperparameters
from training.trainers.digits import (
    DigitsSplit,
    export_digits,
    load_digits_split,
    train_digits_member,
)

SMALL = {"task": "classify", "replicas": 1, "num_cpus": 0.2, "torch_threads": 1}
MEMBERS = ("d-mlp", "d-cnn", "d-mlp2")
SLOW_DELAY_S = 3.0
"""d-slow holds its replica this long on every call: far past the ensemble's deadline."""
STRAGGLE = {"delay_ms": 600, "delay_probability": 0.2}
"""d-mlp2 delays 1 call in 5 by 600 ms (``delay_scope: call``, each call its own draw): the
straggler to hedge. Not ``replica`` scope: a stall there outlives the cancelled call, so the
replica looks idle to Serve's router while it is stalled, and the misses cascade; the two
runs' counts then depend on timing, not only on the draws (CI once saw 7 hedged to 6)."""
HEDGE_DEADLINE_MS = 300
"""Far above an ordinary answer (~10-30 ms for one row), half the straggler's delay."""
HEDGE_AFTER_MS = 50
HEDGE_REQUESTS = 150
"""Unhedged, ~Bin(150, 0.2) requests miss (~30); hedged, only those whose duplicate straggles
too: 21 of 84 stragglers in a 400-request run here, so ~Bin(150, 0.05) (~8). The chance that
hedged >= unhedged all the same: 2.5e-5 (1.2e-4 at 0.06); at 40 requests it was 1.5e-2."""


@dataclass
class Served:
    url: str
    split: DigitsSplit


def train_members(store: ModelStore, workdir: Path, split: DigitsSplit) -> None:
    """Three real digits models, seconds each: 0.93 / 0.93 / 0.93 alone on the validation
    split, ~0.95 as a mean ensemble (seeded, so the same every run)."""
    hp = DigitsHyperparameters(epochs=3, hidden=32, learning_rate=0.01)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread trains ~10 x faster here
    try:
        for name, arch, seed in (
            ("ens-mlp", "mlp", 0),
            ("ens-cnn", "cnn", 3),
            ("ens-mlp2", "mlp", 2),
        ):
            hp_arch = hp.model_copy(update={"epochs": 2}) if arch == "cnn" else hp
            member = train_digits_member(arch, hp_arch, split, seed=seed)
            store.register(name, export_digits(member, workdir / name), task="classify")
    finally:
        torch.set_num_threads(threads)


def ensemble(name: str, members: tuple[str, ...] = MEMBERS, **section: object) -> dict:
    return {
        "name": name,
        "task": "classify",
        "limits": {"max_inputs": 512},
        "ensemble": {"members": list(members), "combine": "mean", **section},
    }


@pytest.fixture(scope="module")
def served(
    ray_session: None, tmp_path_factory: pytest.TempPathFactory, free_port: Callable[[], int]
) -> Iterator[Served]:
    home: Path = tmp_path_factory.mktemp("loom-ensemble")
    env = LoomEnv.from_environ({"LOOM_HOME": str(home)})
    split = load_digits_split(seed=0)
    train_members(ModelStore(env.models_dir), home / "trained", split)
    port = free_port()
    limits = {"limits": {"max_inputs": 512}}
    models = [
        {"name": "d-mlp", "source": "ens-mlp", **SMALL, **limits},
        {"name": "d-cnn", "source": "ens-cnn", **SMALL, **limits},
        {"name": "d-mlp2", "source": "ens-mlp2", **SMALL, **limits, "replicas": 2,
         "faults": STRAGGLE},
        {"name": "d-slow", "source": "ens-cnn", **SMALL,
         "faults": {"delay_ms": SLOW_DELAY_S * 1000, "delay_probability": 1.0}},
        {"name": "d-broken", "source": "ens-mlp2", **SMALL, "faults": {"error_probability": 1.0}},
        ensemble("digits", deadline_ms=20_000),
        ensemble("digits-slow", ("d-mlp", "d-cnn", "d-slow"), deadline_ms=400, quorum=2),
        ensemble("digits-broken-q2", ("d-mlp", "d-cnn", "d-broken"), quorum=2),
        ensemble("digits-broken-q3", ("d-mlp", "d-cnn", "d-broken")),
        ensemble("digits-unhedged", deadline_ms=HEDGE_DEADLINE_MS, quorum=2),
        ensemble(
            "digits-hedged", deadline_ms=HEDGE_DEADLINE_MS, quorum=2, hedge_after_ms=HEDGE_AFTER_MS
        ),
    ]  # fmt: skip
    models = [without_wait_budget(model) for model in models]
    config = parse_config(
        {"training": {"enabled": False}, "server": {"port": port}, "models": models}
    )
    loom = LoomServer(config, env)
    loom.start(ready_timeout_s=300)
    try:
        yield Served(f"http://127.0.0.1:{port}", split)
    finally:
        loom.stop()


def infer(served: Served, model: str, rows: np.ndarray) -> httpx.Response:
    tensor = {"name": "input", "datatype": "FP32", "shape": list(rows.shape)}
    body = {"inputs": [tensor | {"data": rows.ravel().tolist()}]}
    return httpx.post(f"{served.url}/v2/models/{model}/infer", json=body, timeout=60)


def probabilities_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    return np.array(output["data"], dtype=np.float32).reshape(output["shape"])


def test_a_slow_member_is_left_out_within_the_deadline_and_the_answer_is_flagged_partial(
    served: Served,
) -> None:
    rows = served.split.x_val[:4]

    started = time.perf_counter()
    response = infer(served, "digits-slow", rows)
    elapsed_s = time.perf_counter() - started

    assert response.status_code == 200, response.text
    assert elapsed_s < SLOW_DELAY_S  # the 400 ms deadline, not d-slow's 3 s, bounded it
    gather = response.json()["parameters"]
    assert gather["partial"] is True
    assert (gather["answered"], gather["timed_out"]) == (["d-mlp", "d-cnn"], ["d-slow"])
    assert response.headers["x-loom-ensemble-partial"] == "true"
    # the mean of the two that answered, as each gives alone
    alone = [probabilities_of(infer(served, m, rows)) for m in ("d-mlp", "d-cnn")]
    assert np.allclose(probabilities_of(response), np.mean(alone, axis=0), atol=1e-5)


def test_a_failing_member_leaves_a_partial_answer_at_quorum_two_and_a_504_naming_it_at_three(
    served: Served,
) -> None:
    rows = served.split.x_val[:2]

    partial = infer(served, "digits-broken-q2", rows)
    assert partial.status_code == 200, partial.text
    assert partial.json()["parameters"]["failed"] == {"d-broken": "injected fault"}
    assert partial.json()["parameters"]["partial"] is True

    missed = infer(served, "digits-broken-q3", rows)
    assert missed.status_code == 504
    message = missed.json()["error"]  # v2's error shape
    assert "needs 3 of 3" in message
    assert "d-broken failed (injected fault)" in message

    alone = infer(served, "d-broken", rows)  # the member itself: 503, not a 500
    assert alone.status_code == 503
    assert "injected fault" in alone.json()["error"]


def timed_out_count(served: Served, model: str, rows: np.ndarray) -> tuple[int, int]:
    """Requests (one row each, one after another) in which d-mlp2 missed the deadline, and
    in which it was hedged. A 504 (every member late: the machine stalled) counts for
    neither side."""
    timed_out = hedged = 0
    for i in range(HEDGE_REQUESTS):
        response = infer(served, model, rows[i % len(rows)][None])
        if response.status_code == 504:
            continue
        assert response.status_code == 200, response.text
        gather = response.json()["parameters"]
        timed_out += "d-mlp2" in gather["timed_out"]
        hedged += "d-mlp2" in gather["hedged"]
    return timed_out, hedged


def hedge_metric(served: Served, name: str) -> float:
    text = httpx.get(f"{served.url}/metrics", timeout=30).text
    pattern = rf'^{name}_total\{{ensemble="digits-hedged",member="d-mlp2"\}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.M))


def test_hedging_cuts_how_often_a_straggling_member_misses_the_deadline(served: Served) -> None:
    rows = served.split.x_val[:20]

    unhedged, never = timed_out_count(served, "digits-unhedged", rows)
    hedged, sent = timed_out_count(served, "digits-hedged", rows)

    # 1 call in 5 to d-mlp2 waits 600 ms, twice the 300 ms deadline: unhedged, each such
    # request (~30 of 150) misses; hedged after 50 ms, only one whose duplicate straggles too
    # (~1 in 4 of those) misses
    assert never == 0
    assert sent > 0
    assert hedged < unhedged, (hedged, unhedged)
    assert hedge_metric(served, "loom_ensemble_hedges") >= sent
    assert hedge_metric(served, "loom_ensemble_hedge_wins") > 0


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float((probabilities.argmax(axis=1) == labels).mean())


def test_the_ensemble_is_at_least_as_accurate_as_its_best_member_on_the_validation_split(
    served: Served,
) -> None:
    x_val, y_val = served.split.x_val, served.split.y_val  # 360 rows

    ensemble_acc = accuracy(probabilities_of(infer(served, "digits", x_val)), y_val)
    member_acc = {m: accuracy(probabilities_of(infer(served, m, x_val)), y_val) for m in MEMBERS}

    # seeded: ~0.93 each alone, ~0.95 as a mean of all three
    assert ensemble_acc >= max(member_acc.values()), (ensemble_acc, member_acc)


def test_ensembles_are_listed_described_and_ready(served: Served) -> None:
    listed = httpx.get(f"{served.url}/v1/models", timeout=30).json()
    assert {"digits", "digits-hedged"} <= {card["id"] for card in listed["data"]}

    meta = httpx.get(f"{served.url}/v2/models/digits", timeout=30).json()
    assert (meta["name"], meta["platform"]) == ("digits", "loom-ensemble-classify")
    assert meta["parameters"]["members"] == list(MEMBERS)
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    ready = httpx.get(f"{served.url}/v2/models/digits/ready", timeout=30)
    assert (ready.status_code, ready.json()) == (200, {"name": "digits", "ready": True})

    wrong = infer(served, "digits", np.zeros((1, 63), dtype=np.float32))
    assert wrong.status_code == 400  # the members' input check: 64 pixels a row
    assert "shape [n, 64]" in wrong.json()["error"]
