"""Rows of plain values: the ``Rows`` protocol (``serving.messages``) in ten lines, for the
batcher's and the coalescer's tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Items:
    values: tuple[Any, ...]

    def __len__(self) -> int:
        return len(self.values)

    def slice(self, start: int, stop: int) -> Items:
        return Items(self.values[start:stop])

    @classmethod
    def concat(cls, parts: Sequence[Items]) -> Items:
        return Items(tuple(v for p in parts for v in p.values))


def items(*values: Any) -> Items:
    return Items(values)
