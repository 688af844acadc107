"""Each benchmark module's own JSON, read into the ``result.Section`` that ``loom bench``
reports: headline figures (ratios against the baselines measured in the same run), tables
and charts. One module per benchmark, each with ``section(raw) -> Section``; a raw JSON that
lacks a part (a baseline that did not start, a set-up skipped) gives a section that says so
in its notes and still reports the rest.

    section = extract("embeddings", json.loads(Path("raw/embeddings.json").read_text()))
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from benchmarks.plan import BENCHMARKS
from benchmarks.result import Section


def extract(benchmark: str, raw: Mapping[str, Any]) -> Section:
    """``benchmark``'s section from its module's JSON. ``KeyError`` for an unknown name."""
    if benchmark not in BENCHMARKS:
        raise KeyError(f"no benchmark {benchmark!r}: expected one of {', '.join(BENCHMARKS)}")
    module = importlib.import_module(f"benchmarks.sections.{benchmark}")
    section: Section = module.section(raw)
    return section
