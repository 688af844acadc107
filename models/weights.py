"""Which files are weights, and which weight formats Loom will hold: safetensors only.

Pickle-based formats (PyTorch ``.bin``/``.pt``, ``.pkl``, ``.ckpt``, joblib, numpy with
objects) run arbitrary code when loaded, so a folder holding any of them is refused outright,
not merely skipped: a model folder is one unit, and a refused file names itself.

    is_unsafe_weight_file(Path("pytorch_model.bin"))     # True
    require_safe_weights(folder)       # raises UnsafeWeights naming pytorch_model.bin
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from models.errors import UnsafeWeights

SAFE_WEIGHT_SUFFIX = ".safetensors"

UNSAFE_WEIGHT_SUFFIXES: frozenset[str] = frozenset(
    {
        # pickle underneath: loading can execute code
        ".bin",
        ".pt",
        ".pth",
        ".pkl",
        ".pickle",
        ".ckpt",
        ".joblib",
        ".npy",
        ".npz",
        # other frameworks' weights: never loaded by Loom, so never stored beside ours
        ".h5",
        ".keras",
        ".msgpack",
    }
)
"""Suffixes (lower case) of weight files in formats other than safetensors."""


def is_unsafe_weight_file(path: Path) -> bool:
    """True if ``path``'s suffix is a non-safetensors weight format (case-insensitive)."""
    return path.suffix.lower() in UNSAFE_WEIGHT_SUFFIXES


def require_safe_weights(folder: Path) -> None:
    """Raise ``UnsafeWeights`` unless ``folder`` holds safetensors weights and nothing else.

    The message names the first offending file, or says that no ``*.safetensors`` exists.
    """
    paths = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()]
    require_safe_weight_paths(paths, where=str(folder))


def require_safe_weight_paths(paths: Iterable[str], *, where: str) -> None:
    """``require_safe_weights`` for a list of relative file paths; ``where`` words the error."""
    paths = sorted(paths)
    unsafe = [p for p in paths if is_unsafe_weight_file(Path(p))]
    if unsafe:
        more = f" (and {len(unsafe) - 1} more)" if len(unsafe) > 1 else ""
        raise UnsafeWeights(
            f"refusing {unsafe[0]!r} in {where}{more}: only safetensors weights are accepted, "
            f"since pickle-based formats can run code when loaded; convert it to .safetensors"
        )
    if not any(p.lower().endswith(SAFE_WEIGHT_SUFFIX) for p in paths):
        raise UnsafeWeights(f"no *.safetensors weights file in {where}")
