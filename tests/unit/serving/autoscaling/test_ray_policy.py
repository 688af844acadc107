"""The Ray Serve adapter of the policy (issue 14, point 2): Serve's context in, the count and
the window state out, the decision written for the sidecar. Serve's AutoscalingContext is
built as Serve builds it; the reading is fed to the process's poller by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ray.serve._private.common import DeploymentID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from serving.autoscaling import pollers, ray_policy
from serving.autoscaling.policy import KV_CACHE_USE, LATENCY_P95, QUEUE_DEPTH, WAITING_SEQUENCES
from serving.autoscaling.readings import Reading
from serving.config.sections import AutoscalingConfig as LoomAutoscaling


class FixedPoller:
    def __init__(self, reading: Reading | None) -> None:
        self.reading = reading

    def latest(self, app: str) -> Reading | None:
        return self.reading


def context(current: int, state: dict[str, Any] | None = None, requests: float = 0) -> Any:
    return AutoscalingContext(
        deployment_id=DeploymentID(name="model-m", app_name="loom.m@1"),
        deployment_name="model-m",
        app_name="loom.m@1",
        current_num_replicas=current,
        target_num_replicas=current,
        running_replicas=[],
        total_num_requests=requests,
        total_queued_requests=0,
        aggregated_metrics={},
        raw_metrics={},
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8,
        policy_state=state or {},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=None,
        config=None,
    )


@pytest.fixture
def policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    config = LoomAutoscaling(
        min_replicas=1, max_replicas=8, target_queue_depth=4, upscale_delay_s=0,
        downscale_delay_s=0, latency_slo_ms=100,
    )  # fmt: skip
    source = pollers.Source(stats_dir=str(tmp_path / "stats"))
    options = ray_policy.autoscaling_config("m", "embed", config, source)
    policy = options["policy"]
    # Serve unpickles the class and makes it with the kwargs. Not unpickled here: in the
    # process that pickled it, cloudpickle would rebind the class's methods to a copy of its
    # module's globals (the integration tier runs it in Serve's controller)
    assert policy.policy_function == "serving.autoscaling.ray_policy.LoomAutoscalingPolicy"
    assert policy.get_serialized_policy_def()
    made = ray_policy.LoomAutoscalingPolicy(**policy.policy_kwargs)
    feed = FixedPoller(None)
    made.readings = feed
    return made, feed, tmp_path / "stats"


def test_the_deployments_config_hands_the_windows_to_the_policy(tmp_path: Path) -> None:
    config = LoomAutoscaling(min_replicas=0, max_replicas=4, upscale_delay_s=3)
    options = ray_policy.autoscaling_config(
        "m", "generate", config, pollers.Source(stats_dir=str(tmp_path))
    )
    serve_config = AutoscalingConfig(**options)  # Serve accepts it
    # Serve's own delays would add to the policy's windows
    assert (serve_config.upscale_delay_s, serve_config.downscale_delay_s) == (0, 0)
    assert serve_config.initial_replicas == 1  # from zero: one starts with the app
    kwargs = serve_config.policy.policy_kwargs
    assert kwargs["upscale_delay_s"] == 3
    assert kwargs["task"] == "generate"


def test_a_deep_queue_scales_up_and_the_decision_is_written_for_the_sidecar(policy) -> None:
    made, feed, stats_dir = policy
    feed.reading = Reading(app="loom.m@1", at_s=_now(), queue_depth=24.0, latency_p95_ms=50.0)
    desired, state = made(context(2))
    # 24 queued over 2 replicas = 12 each; target 4 -> ceil(2 x 12 / 4) = 6
    assert desired == 6
    assert state == {ray_policy.STATE_KEY: {"direction": 0, "since_s": None, "to": None}}
    [written] = stats_dir.glob("autoscaler-*.json")
    decision = json.loads(written.read_text())["models"][0]
    assert decision["gauges"]["desired_replicas"] == 6
    assert decision["deciding"] == QUEUE_DEPTH
    assert decision["signals"] == {QUEUE_DEPTH: 12.0, LATENCY_P95: 50.0}


def test_latency_over_the_slo_decides_when_the_queue_is_calm(policy) -> None:
    made, feed, _ = policy
    feed.reading = Reading(app="loom.m@1", at_s=_now(), queue_depth=4.0, latency_p95_ms=300.0)
    desired, _ = made(context(2))
    assert desired == 6  # 300 ms against 100: ceil(2 x 3) = 6; the queue asks for 2 x 2/4 -> 1


def test_with_no_reading_the_count_holds(policy) -> None:
    made, feed, _ = policy
    feed.reading = None
    assert made(context(3))[0] == 3


def test_the_window_state_round_trips_through_serve(tmp_path: Path, monkeypatch) -> None:
    config = LoomAutoscaling(min_replicas=1, max_replicas=8, upscale_delay_s=60)
    options = ray_policy.autoscaling_config(
        "m", "embed", config, pollers.Source(stats_dir=str(tmp_path))
    )
    made = ray_policy.LoomAutoscalingPolicy(**options["policy"].policy_kwargs)
    made.readings = FixedPoller(
        Reading(app="loom.m@1", at_s=_now(), queue_depth=40.0, latency_p95_ms=0)
    )
    desired, state = made(context(1))
    assert desired == 1  # the up window opened; 60 s to go
    assert state[ray_policy.STATE_KEY]["direction"] == 1
    desired, again = made(context(1, state))
    assert again[ray_policy.STATE_KEY]["since_s"] == state[ray_policy.STATE_KEY]["since_s"]


@pytest.mark.parametrize(
    ("reading", "current", "names_and_observed"),
    [
        (
            Reading("a", 0.0, queue_depth=8.0, latency_p95_ms=20.0, waiting_sequences=6.0,
                    kv_cache_use=0.5),
            2,
            {QUEUE_DEPTH: 4.0, LATENCY_P95: 20.0, WAITING_SEQUENCES: 3.0, KV_CACHE_USE: 0.5},
        ),
        (None, 2, {QUEUE_DEPTH: None, LATENCY_P95: None, WAITING_SEQUENCES: None,
                   KV_CACHE_USE: None}),
    ],
)  # fmt: skip
def test_generation_is_scaled_on_four_signals_per_replica(reading, current, names_and_observed):
    targets = ray_policy.Targets(
        queue_depth=4, latency_slo_ms=100, waiting_sequences=2, kv_cache_use=0.8
    )
    signals = ray_policy.signals_from(reading, "generate", targets, current)
    assert {s.name: s.observed for s in signals} == names_and_observed


def _now() -> float:
    import time

    return time.time()


def test_it_goes_to_zero_only_once_serves_handles_count_no_request(tmp_path: Path) -> None:
    config = LoomAutoscaling(min_replicas=0, max_replicas=2, upscale_delay_s=0, downscale_delay_s=0)
    options = ray_policy.autoscaling_config(
        "m", "embed", config, pollers.Source(stats_dir=str(tmp_path))
    )
    made = ray_policy.LoomAutoscalingPolicy(**options["policy"].policy_kwargs)
    made.readings = FixedPoller(
        Reading(app="loom.m@1", at_s=_now(), queue_depth=0.0, latency_p95_ms=0.0)
    )
    # idle replicas, but the handles' look-back still holds a request: Serve's cold start
    # would bring a replica straight back, so the count holds
    assert made(context(1, requests=0.4))[0] == 1
    assert made(context(1, requests=0.0))[0] == 0
