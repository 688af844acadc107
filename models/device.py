"""Device and dtype from config text: ``"auto"``, ``"cpu"``, ``"cuda:1"``; ``"bfloat16"``.

A request the machine cannot honour fails here, when the engine is built, with a message that
says why, rather than deep inside the first forward pass.

    device = resolve_device("auto")            # cuda if there is one, else cpu
    dtype = resolve_dtype("auto", device)       # float16 on cuda, float32 on cpu
"""

from __future__ import annotations

import re

import torch

DEVICE_SPECS = ("auto", "cpu", "cuda", "cuda:N")
DTYPE_SPECS = ("auto", "float32", "float16", "bfloat16")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_CUDA_SPEC = re.compile(r"cuda(?::(\d+))?")


def resolve_device(spec: str) -> torch.device:
    """``auto`` (cuda:0 when CUDA is available, else cpu), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises ``ValueError`` for other text, for CUDA on a machine without it, and for a CUDA
    index past the last device.
    """
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = _CUDA_SPEC.fullmatch(spec)
    if match is None:
        raise ValueError(f"unknown device {spec!r}: expected one of {', '.join(DEVICE_SPECS)}")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {spec!r} asked for, but CUDA is not available here "
            f"(torch {torch.__version__}); use 'cpu' or 'auto'"
        )
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"device {spec!r} asked for, but only {count} CUDA device(s) exist")
    return torch.device("cuda", index)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto`` (float16 on cuda, float32 on cpu), ``float32``, ``float16`` or ``bfloat16``.

    Half precision on the CPU is refused: it is slower than float32 there, and some kernels
    lack it. bfloat16 on a GPU without it (before Ampere) is refused too.
    """
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if spec not in _DTYPES:
        raise ValueError(f"unknown dtype {spec!r}: expected one of {', '.join(DTYPE_SPECS)}")
    dtype = _DTYPES[spec]
    if device.type == "cpu" and dtype != torch.float32:
        raise ValueError(
            f"dtype {spec!r} on the CPU is not supported: use float32 (or 'auto') on the CPU"
        )
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype 'bfloat16' is not supported by {device}; use float16")
    return dtype
