"""Fixtures the reconciler and sharding tests share: fakes of Serve's version apps and of the
route board (``test_reconciler``)."""

from __future__ import annotations

import pytest
from rollout_fakes import FakeApps, FakeBoard


@pytest.fixture
def apps() -> FakeApps:
    return FakeApps()


@pytest.fixture
def board(apps: FakeApps) -> FakeBoard:
    return FakeBoard(apps)
