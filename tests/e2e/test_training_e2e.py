"""Training jobs through `loom serve` as users run them: `loom train submit --follow`, the
/v1/jobs routes behind API keys, and the served model moving to the job's result.

The keyed server (conftest) serves ``digits`` (version 1: untrained weights, ~10% right). A
digits job named ``digits`` with ``promote: true`` registers its members as versions 2 and 3
and moves the ``serving`` alias; the rollout reconciler follows, and v2 ``infer`` answers
with the trained model."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from loom_process import API_KEY, LoomProcess, run_loom

from training.trainers.digits import load_digits_split
from training.webhook_signing import SIGNATURE_HEADER, verify_signature

AUTH = {"Authorization": f"Bearer {API_KEY}"}
KEY_ENV = {"LOOM_API_KEYS": API_KEY}


class Receiver(BaseHTTPRequestHandler):
    """A client's webhook endpoint: keeps each CloudEvent POSTed to it, and its signature."""

    received: list[dict[str, Any]] = []
    signed: list[tuple[bytes, str | None]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.received.append(json.loads(body))
        Receiver.signed.append((body, self.headers.get(SIGNATURE_HEADER)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[str]:
    Receiver.received = []
    Receiver.signed = []
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()


def served_accuracy(url: str) -> float:
    """Accuracy of the served model on the first 256 validation images (a request's limit)."""
    split = load_digits_split(seed=0)
    x_val, y_val = split.x_val[:256], split.y_val[:256]
    body = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(x_val.shape),
                "data": x_val.astype(np.float32).ravel().tolist(),
            }
        ]
    }
    answer = httpx.post(f"{url}/v2/models/digits/infer", json=body, headers=AUTH, timeout=30)
    assert answer.status_code == 200, answer.text
    output = answer.json()["outputs"][0]
    probabilities = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    return float((probabilities.argmax(axis=1) == y_val).mean())


def test_a_submitted_digits_job_trains_and_the_served_model_follows_it(
    keyed_server: LoomProcess, tmp_path: Path, webhook: str
) -> None:
    url = keyed_server.url
    assert served_accuracy(url) < 0.5  # version 1: untrained
    spec = {
        "name": "digits",
        "trainer": "digits",
        "hyperparameters": {"arch": ["mlp", "cnn"], "epochs": 20},
        "eval": {"min_accuracy": 0.95},
        "stage_workers": 2,  # the two members train in parallel through the work queue
        "promote": True,
        "webhook_url": webhook,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    done = run_loom(
        keyed_server.home, "train", "submit", str(path), "--follow", "--url", url,
        env=KEY_ENV, timeout_s=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    [job] = httpx.get(f"{url}/v1/jobs", params={"state": "succeeded"}, headers=AUTH).json()["data"]
    metrics = job["metrics"]
    # one version per member (1 was there before), the best by validation accuracy promoted
    assert set(metrics["accuracies"]) == {"mlp", "cnn"}
    assert metrics["val_accuracy"] == max(metrics["accuracies"].values()) >= 0.95
    assert sorted(metrics["versions"].values()) == ["2", "3"]
    assert metrics["version"] == metrics["versions"][metrics["best_member"]]
    # the reconciler rolls the promoted version out; then infer answers with it
    deadline = time.monotonic() + 90
    accuracy = served_accuracy(url)
    while accuracy < 0.95 and time.monotonic() < deadline:
        time.sleep(1)
        accuracy = served_accuracy(url)
    assert accuracy >= 0.95

    # the job's events, as CloudEvents over SSE, end with its success
    with httpx.stream(
        "GET", f"{url}/v1/jobs/{job['id']}/events", headers=AUTH, timeout=30
    ) as stream:
        frames = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
    assert frames[0]["type"] == "loom.job.queued"
    assert frames[-1]["type"] == "loom.job.succeeded"
    assert {f["specversion"] for f in frames} == {"1.0"}
    # a finished job cannot be cancelled; its logs name every member
    assert httpx.post(f"{url}/v1/jobs/{job['id']}/cancel", headers=AUTH).status_code == 409
    logs = run_loom(keyed_server.home, "train", "logs", job["id"], "--url", url, env=KEY_ENV)
    assert "member mlp: validation accuracy" in logs.stdout
    # the webhook got every state change as a CloudEvent, in order
    deadline = time.monotonic() + 15
    while len(Receiver.received) < len(frames) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [event["id"] for event in Receiver.received] == [frame["id"] for frame in frames]
    # each delivery is signed with the secret the submit showed once (on the CLI's stderr)
    secret = done.stderr.split("webhook secret (shown once", 1)[1].split(": ", 1)[1].split()[0]
    for body, signature in Receiver.signed:
        assert signature is not None
        verify_signature(body, signature, secret, now_s=time.time(), tolerance_s=600)
    # 127.0.0.1 is allowed by this server's config; the cloud metadata address is not
    refused = httpx.post(
        f"{url}/v1/jobs",
        json={**spec, "webhook_url": "http://169.254.169.254/latest/meta-data/"},
        headers=AUTH,
    )
    assert refused.status_code == 422, refused.text
    assert [f["field"] for f in refused.json()["error"]["fields"]] == ["webhook_url"]


def test_a_bad_spec_is_refused_with_field_errors_before_anything_is_queued(
    keyed_server: LoomProcess,
) -> None:
    url = keyed_server.url
    assert httpx.get(f"{url}/v1/jobs").status_code == 401  # the jobs API is behind the keys
    before = len(httpx.get(f"{url}/v1/jobs", headers=AUTH).json()["data"])
    bad = {"name": "x", "trainer": "lm", "hyperparameters": {"learning_rate": -1}, "workers": 999}
    answer = httpx.post(f"{url}/v1/jobs", json=bad, headers=AUTH)
    assert answer.status_code == 422
    fields = {f["field"] for f in answer.json()["error"]["fields"]}
    assert "hyperparameters.learning_rate" in fields
    assert len(httpx.get(f"{url}/v1/jobs", headers=AUTH).json()["data"]) == before
    assert httpx.get(f"{url}/v1/jobs/job-nope", headers=AUTH).status_code == 404
