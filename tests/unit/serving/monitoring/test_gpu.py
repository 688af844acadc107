"""The sidecar's GPU readings (issue 14, point 1) through NVML's Python API, faked here: no
GPU on this machine or CI. The fake answers what ``pynvml`` answers (utilisation in percent,
memory in bytes, power in milliwatts) and raises its ``NVMLError`` where a board has no power
sensor, so the mapping to Loom's series is what is tested; a real board's readings are a
GPU machine's to check."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from serving.monitoring.gpu import GpuReader
from serving.monitoring.sidecar import SidecarCollector, SidecarSettings


class FakeNvml:
    class NVMLError(Exception):
        pass

    def __init__(self, boards: list[dict[str, Any]]) -> None:
        self.boards = boards

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802 (NVML's names)
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:  # noqa: N802
        return self.boards[handle]["uuid"].encode()

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:  # noqa: N802
        return SimpleNamespace(gpu=self.boards[handle]["util_percent"], memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:  # noqa: N802
        board = self.boards[handle]
        return SimpleNamespace(used=board["used"], total=board["total"], free=0)

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:  # noqa: N802
        milliwatts = self.boards[handle]["power_mw"]
        if milliwatts is None:
            raise self.NVMLError("not supported")
        return int(milliwatts)

    def nvmlShutdown(self) -> None:  # noqa: N802
        pass


BOARDS = [
    {"uuid": "GPU-aaaa", "util_percent": 87, "used": 30 * 2**30, "total": 80 * 2**30,
     "power_mw": 412_500},
    {"uuid": "GPU-bbbb", "util_percent": 0, "used": 0, "total": 80 * 2**30, "power_mw": None},
]  # fmt: skip


def test_each_gpu_is_read_in_loom_units_and_a_missing_power_sensor_is_absent() -> None:
    first, second = GpuReader(FakeNvml(BOARDS), count=2).read()
    assert (first.index, first.uuid, first.utilization_ratio) == (0, "GPU-aaaa", 0.87)
    assert (first.memory_used_bytes, first.power_watts) == (30 * 2**30, 412.5)  # mW -> W
    assert second.power_watts is None


def test_the_sidecar_exports_gpu_series_labelled_by_node_index_and_uuid(tmp_path) -> None:
    collector = SidecarCollector(
        SidecarSettings(stats_dir=tmp_path, node="n1"), GpuReader(FakeNvml(BOARDS), count=2)
    )
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert 'loom_gpu_utilization_ratio{gpu="0",node="n1",uuid="GPU-aaaa"} 0.87' in text
    assert 'loom_gpu_power_watts{gpu="0",node="n1",uuid="GPU-aaaa"} 412.5' in text
    assert 'loom_gpu_power_watts{gpu="1"' not in text  # no sensor: absent, not zero
    assert 'loom_gpu_memory_total_bytes{gpu="1",node="n1",uuid="GPU-bbbb"}' in text


@pytest.mark.skipif(Path("/dev/nvidiactl").exists(), reason="an NVIDIA driver is here: NVML opens")
def test_without_a_driver_there_is_no_reader_at_all() -> None:
    assert GpuReader.open() is None
