"""``GET /v1/admin/targets`` (issue 14, point 1): Prometheus HTTP service discovery of the
gateway and every sidecar, admin-scoped when keys are on."""

from __future__ import annotations

from serving.monitoring.targets import advertised, http_sd


def test_targets_list_the_gateway_then_each_sidecar_with_its_job_and_node() -> None:
    groups = http_sd(
        gateway="10.0.0.5:8000",
        sidecars=[
            {"address": "10.0.0.7:9470", "node": "b"},
            {"address": "10.0.0.6:9470", "node": "a"},
        ],
        tls=True,
    )
    assert groups == [
        {"targets": ["10.0.0.5:8000"], "labels": {"job": "loom-gateway", "__scheme__": "https"}},
        {"targets": ["10.0.0.6:9470"], "labels": {"job": "loom-sidecar", "node": "a"}},
        {"targets": ["10.0.0.7:9470"], "labels": {"job": "loom-sidecar", "node": "b"}},
    ]


def test_a_listener_on_every_address_is_advertised_on_the_nodes() -> None:
    assert advertised("0.0.0.0", 8000, "10.0.0.5") == "10.0.0.5:8000"
    assert advertised("127.0.0.1", 8000, "10.0.0.5") == "127.0.0.1:8000"
    assert advertised("::", 8000, "fd00::5") == "[fd00::5]:8000"
