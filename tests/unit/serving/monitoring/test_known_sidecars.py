"""The gateway's list of sidecars for ``GET /v1/admin/targets`` (issue 14): a sidecar that
stops answering stays listed at its last address (Prometheus then shows it down); one whose
actor is gone is dropped. Ray's listing and the sidecars' answers are faked."""

from __future__ import annotations

import asyncio

import pytest

from serving.monitoring import sidecar_actor
from serving.monitoring.sidecar_actor import KnownSidecars

A = {"name": "loom-sidecar-n1-abcd", "address": "10.0.0.1:9470", "node": "n1"}


def test_a_silent_sidecar_keeps_its_last_address_until_its_actor_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answering: list[dict[str, str]] = [A]
    actors = [A["name"]]

    async def list_sidecars(stats_dir: str | None = None) -> list[dict[str, str]]:
        return list(answering)

    monkeypatch.setattr(sidecar_actor, "list_sidecars", list_sidecars)
    monkeypatch.setattr(sidecar_actor, "_named_sidecars", lambda stats_dir=None: list(actors))
    known = KnownSidecars("/var/run/loom/stats")

    assert asyncio.run(known()) == [A]
    answering.clear()  # restarting, or hung: it answers nothing
    assert asyncio.run(known()) == [A]  # still a target: Prometheus sees it down
    actors.clear()  # its node left
    assert asyncio.run(known()) == []
