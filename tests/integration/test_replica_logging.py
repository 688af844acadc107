"""Loom's log lines inside a real Serve replica land in Serve's log for that replica, at
their own level (a warning stays a warning), INFO lines included; outside a replica the
call changes nothing."""

from __future__ import annotations

import logging
from pathlib import Path

import ray
from ray import serve
from ray.serve._private.logging_utils import get_component_logger_file_path

from serving.replica_logging import route_to_serve_log


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Logs:
    def __init__(self) -> None:
        self.routed = route_to_serve_log()

    def __call__(self, marker: str) -> dict:
        logging.getLogger("serving.gateway.endpoint").warning("%s warning", marker)
        logging.getLogger("models.store").info("%s info", marker)
        for handler in logging.getLogger("ray.serve").handlers:
            handler.flush()  # Serve buffers up to 1,000 lines before writing its file
        relative = get_component_logger_file_path()
        assert relative is not None
        logs_dir = ray._private.worker._global_node.get_logs_dir_path()
        return {"routed": self.routed, "file": str(Path(logs_dir + relative))}


def test_a_replicas_loom_lines_are_in_serves_log_at_their_level(serve_running: None) -> None:
    handle = serve.run(Logs.bind(), name="replica-logging-test", route_prefix=None)
    answer = handle.remote("marker-7f3a").result()
    assert answer["routed"]
    lines = Path(answer["file"]).read_text().splitlines()
    warning = [line for line in lines if "marker-7f3a warning" in line]
    info = [line for line in lines if "marker-7f3a info" in line]
    assert len(warning) == 1
    assert "WARNING" in warning[0]
    assert len(info) == 1
    assert "INFO" in info[0]


def test_outside_a_replica_nothing_changes() -> None:
    before = logging.getLogger("serving").handlers[:], logging.getLogger("serving").propagate
    assert route_to_serve_log() is False
    assert (logging.getLogger("serving").handlers, logging.getLogger("serving").propagate) == before
