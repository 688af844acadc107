"""A gateway's view of the route table: it applies newer tables, picks by weight, reports
what it has in flight; and the board it polls."""

from __future__ import annotations

import asyncio

import pytest

from serving.rollout.route_table import (
    NotRouted,
    RouteBoard,
    RouteFollower,
    RouteTable,
    VersionRoute,
)


def route(model: str, version: str, weight: float = 1.0) -> VersionRoute:
    return VersionRoute(model, version, weight, f"loom.{model}@{version}", f"h{version}")


class Board:
    """Answers each poll with the next scripted table (None: nothing newer) and keeps reports."""

    def __init__(self, *tables: RouteTable | None) -> None:
        self.tables = list(tables)
        self.reports: list[tuple[int, dict[str, int]]] = []

    async def poll(self, gateway_id: str, epoch: int, busy: dict[str, int], wait_s: float):
        self.reports.append((epoch, busy))
        return self.tables.pop(0) if self.tables else None


def test_a_newer_table_is_applied_after_new_versions_are_warmed_and_an_older_one_ignored():
    warmed: list[str] = []
    newer = RouteTable(2, {"m": (route("m", "2"),)})
    board = Board(RouteTable(1, {"m": (route("m", "1"),)}), newer, RouteTable(1, {}))

    async def warm_up(r: VersionRoute) -> None:
        warmed.append(r.app_name)

    async def scenario() -> list[str]:
        follower = RouteFollower(board.poll, warm_up=warm_up)
        picked = []
        for _ in range(3):
            await follower.poll_once()
            picked.append(follower.pick("m").version)
        return picked

    assert asyncio.run(scenario()) == ["1", "2", "2"]
    assert warmed == ["loom.m@1", "loom.m@2"]
    assert [epoch for epoch, _ in board.reports] == [0, 1, 2]


def test_pick_splits_by_weight_and_primary_is_the_heaviest():
    draws = iter([0.0, 0.89, 0.9, 0.99])
    follower = RouteFollower(Board().poll, draw=lambda: next(draws))
    follower.table = RouteTable(1, {"m": (route("m", "3", 90), route("m", "4", 10))})

    assert [follower.pick("m").version for _ in range(4)] == ["3", "3", "4", "4"]
    assert follower.primary("m").version == "3"
    assert follower.weights() == {"m": {"3": 90, "4": 10}}


def test_a_model_with_no_route_is_not_routed():
    follower = RouteFollower(Board().poll)
    with pytest.raises(NotRouted):
        follower.pick("m")


def test_requests_in_flight_are_reported_per_app_until_they_finish():
    board = Board()
    follower = RouteFollower(board.poll)
    with follower.tracking("loom.m@1"), follower.tracking("loom.m@1"):
        asyncio.run(follower.poll_once())
    asyncio.run(follower.poll_once())
    assert [busy for _, busy in board.reports] == [{"loom.m@1": 2}, {}]


def test_the_board_answers_a_waiting_poll_as_soon_as_a_table_is_published():
    async def scenario() -> tuple[RouteTable | None, RouteTable | None, dict]:
        board = RouteBoard()
        idle = await board.poll("g1", 0, {}, wait_s=0.01)  # nothing newer: None after the wait
        waiting = asyncio.create_task(board.poll("g1", 0, {"loom.m@1": 1}, wait_s=30))
        await asyncio.sleep(0.01)
        epoch = await board.publish({"m": (route("m", "1"),)})
        table = await asyncio.wait_for(waiting, 1)
        assert epoch == 1
        return idle, table, await board.reports()

    idle, table, reports = asyncio.run(scenario())
    assert idle is None
    assert table.epoch == 1
    assert table.routes["m"][0].version == "1"
    assert reports["g1"].epoch == 0
    assert reports["g1"].busy == {"loom.m@1": 1}
