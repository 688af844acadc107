"""The GPU benchmark's section: ``benchmarks.gpu_report`` reads ``gpu.json`` (it also serves
``python -m benchmarks.gpu``, which writes its own result without ``loom bench``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from benchmarks.gpu_report import sections
from benchmarks.result import Section


def section(raw: Mapping[str, Any]) -> Section:
    return sections(raw)[0]
