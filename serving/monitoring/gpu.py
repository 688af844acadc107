"""The node's GPUs through NVML (``nvidia-ml-py``): utilisation, memory and power per device.

Without an NVIDIA driver (this machine, CI) ``GpuReader.open()`` answers None and the
sidecar exports no GPU series at all: absent, not zero, so a dashboard shows "no data"
rather than an idle GPU that does not exist.

    gpus = GpuReader.open()          # None without a driver
    for reading in gpus.read() if gpus else []:
        reading.utilization_ratio, reading.memory_used_bytes
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuReading:
    index: int
    uuid: str
    utilization_ratio: float
    """Share of the last sample period a kernel ran (NVML's GPU utilisation / 100)."""
    memory_used_bytes: int
    memory_total_bytes: int
    power_watts: float | None
    """None where the board does not report power."""


class GpuReader:
    """Reads every GPU NVML sees. Made by ``open``; ``close`` shuts NVML down."""

    def __init__(self, nvml: Any, count: int) -> None:
        self._nvml = nvml
        self.count = count

    @classmethod
    def open(cls) -> GpuReader | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            count = int(pynvml.nvmlDeviceGetCount())
        except Exception as exc:  # no driver, no library, no device: no GPU series
            logger.info("no GPU readings: %s", exc)
            return None
        if count == 0:
            pynvml.nvmlShutdown()
            return None
        return cls(pynvml, count)

    def read(self) -> list[GpuReading]:
        nvml = self._nvml
        readings = []
        for index in range(self.count):
            try:
                device = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = nvml.nvmlDeviceGetUUID(device)
                utilization = nvml.nvmlDeviceGetUtilizationRates(device)
                memory = nvml.nvmlDeviceGetMemoryInfo(device)
                try:
                    power_watts: float | None = nvml.nvmlDeviceGetPowerUsage(device) / 1000.0
                except nvml.NVMLError:  # milliwatts where supported
                    power_watts = None
            except nvml.NVMLError as exc:  # a device lost (Xid): skip it this scrape
                logger.warning("GPU %d: no reading (%s)", index, exc)
                continue
            readings.append(
                GpuReading(
                    index=index,
                    uuid=uuid if isinstance(uuid, str) else uuid.decode(),
                    utilization_ratio=utilization.gpu / 100.0,
                    memory_used_bytes=int(memory.used),
                    memory_total_bytes=int(memory.total),
                    power_watts=power_watts,
                )
            )
        return readings

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception as exc:
            logger.debug("NVML shutdown: %s", exc)
