"""API keys on, the bind rule, and the CLI against a running server."""

from __future__ import annotations

import json
import socket

import httpx
from loom_process import API_KEY, LoomProcess, run_loom

KEY = API_KEY


def test_with_keys_every_model_route_needs_a_bearer_key(keyed_server: LoomProcess) -> None:
    url = keyed_server.url
    body = {"model": "minilm", "input": "secret"}
    missing = httpx.post(f"{url}/v1/embeddings", json=body)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"
    wrong = httpx.post(f"{url}/v1/embeddings", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/v2/models/minilm").json() == {
        "error": "missing API key: send 'Authorization: Bearer <key>'"
    }
    for key in (
        KEY,
        "config-key-0123456789",
    ):  # the environment's key and the config file's both work
        ok = httpx.post(
            f"{url}/v1/embeddings", json=body, headers={"Authorization": f"Bearer {key}"}
        )
        assert ok.status_code == 200


def test_with_keys_health_and_metrics_stay_open(keyed_server: LoomProcess) -> None:
    url = keyed_server.url
    assert httpx.get(f"{url}/v2/health/live").status_code == 200
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200


def test_loom_status_shows_deployments_using_the_key(keyed_server: LoomProcess) -> None:
    result = run_loom(
        keyed_server.home, "status", "--url", keyed_server.url, "--json", env={"LOOM_API_KEYS": KEY}
    )
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["deployments"]["model-minilm"]["running_replicas"] == 1


def test_binding_a_public_address_without_keys_is_refused(tmp_path, free_port) -> None:
    result = run_loom(tmp_path, "serve", "--host", "0.0.0.0", "--port", str(free_port()))
    assert result.returncode == 2
    assert "without API keys" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_config_file_is_refused_naming_the_field(tmp_path, free_port) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  - {name: m, source: minilm, batching: {max_batch_size: -1}}\n")
    result = run_loom(tmp_path, "serve", "--config", str(path), "--port", str(free_port()))
    assert result.returncode == 2
    assert "models.0.batching.max_batch_size" in result.stderr


def test_a_port_in_use_is_refused_before_anything_starts(tmp_path, free_port) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = run_loom(tmp_path, "serve", "--port", str(port))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
