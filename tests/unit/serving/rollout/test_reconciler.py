"""The reconciler's order of operations, against fakes of Serve, the store and the board."""

from __future__ import annotations

import pytest
from rollout_fakes import FakeApps, FakeBoard, Store, actions, reconciler

from serving.config import ModelConfig
from serving.rollout.plan import AppState


def test_an_alias_move_starts_the_new_version_routes_it_once_running_then_deletes_the_old(
    apps: FakeApps, board: FakeBoard
) -> None:
    store = Store(minilm="1")
    rec = reconciler([ModelConfig(name="minilm", source="minilm")], store, apps, board)
    rec.step()
    apps.set("minilm", "1", AppState.RUNNING)
    rec.step()
    assert actions(apps) == ["deploy loom.minilm@1", "publish minilm=1x1"]

    apps.log.clear()
    store.aliases["minilm"] = "2"  # loom models promote minilm 2
    rec.step()
    rec.step()  # 2 still loading: 1 keeps serving
    assert actions(apps) == ["deploy loom.minilm@2"]
    assert rec.routed == {"minilm": {"1": 1.0}}

    apps.set("minilm", "2", AppState.RUNNING)
    rec.step()
    assert actions(apps) == ["deploy loom.minilm@2", "publish minilm=2x1"]
    rec.step()
    assert actions(apps)[-1] == "delete loom.minilm@1"
    assert board.tables[-1]["minilm"][0].handle == "handle:loom.minilm@2"


def test_the_old_version_is_not_deleted_while_a_gateway_still_has_requests_on_it(
    apps: FakeApps, board: FakeBoard
) -> None:
    store = Store(m="1")
    rec = reconciler([ModelConfig(name="m", source="m")], store, apps, board, drain_timeout_s=5)
    apps.set("m", "1", AppState.RUNNING)
    rec.step()
    store.aliases["m"] = "2"
    apps.set("m", "2", AppState.RUNNING)
    board.gateway_busy = {"loom.m@1": 1}  # a request on 1 never finishes: the drain times out

    rec.step()

    assert any("did not drain ['loom.m@1'] within 5 s" in line for line in apps.log)
    assert rec.routed == {"m": {"2": 1.0}}
    rec.step()
    assert actions(apps)[-1] == "delete loom.m@1"  # only after the wait, on the next step


def test_a_version_that_fails_to_start_leaves_the_old_one_serving(
    apps: FakeApps, board: FakeBoard
) -> None:
    store = Store(m="1")
    rec = reconciler([ModelConfig(name="m", source="m")], store, apps, board)
    apps.set("m", "1", AppState.RUNNING)
    rec.step()
    store.aliases["m"] = "2"
    rec.step()
    apps.set("m", "2", AppState.FAILED, "weights do not match the manifest")

    rec.step()
    rec.step()

    assert rec.routed == {"m": {"1": 1.0}}
    assert actions(apps) == ["publish m=1x1", "deploy loom.m@2"]  # no retry, no delete
    failures = [line for line in apps.log if "failed to start" in line]
    assert failures == [  # said once
        "event m: version 2 failed to start (weights do not match the manifest); "
        "still serving version 1"
    ]


def test_a_pinned_source_never_moves_and_a_split_routes_its_weights(
    apps: FakeApps, board: FakeBoard
) -> None:
    store = Store(m="9")  # the alias points elsewhere: neither model below follows it
    models = [
        ModelConfig(name="pinned", source="m@1"),
        ModelConfig(name="canary", source="m", traffic={"1": 90, "2": 10}),
    ]
    rec = reconciler(models, store, apps, board)
    rec.step()
    for model, version in (("pinned", "1"), ("canary", "1"), ("canary", "2")):
        apps.set(model, version, AppState.RUNNING)
    rec.step()
    rec.step()

    assert actions(apps) == [
        "deploy loom.canary@1",
        "deploy loom.canary@2",
        "deploy loom.pinned@1",
        "publish canary=1x90,2x10 pinned=1x1",
    ]
    canary = board.tables[-1]["canary"]
    assert [r.version for r in canary] == ["1", "2"]  # heaviest first: what metadata shows


def test_an_alias_that_disappears_keeps_the_current_version_serving(
    apps: FakeApps, board: FakeBoard
) -> None:
    store = Store(m="1")
    rec = reconciler([ModelConfig(name="m", source="m")], store, apps, board)
    apps.set("m", "1", AppState.RUNNING)
    rec.step()
    del store.aliases["m"]

    plan = rec.step()

    assert plan.is_idle
    assert rec.routed == {"m": {"1": 1.0}}
    assert any("does not resolve" in line for line in apps.log)


def test_serving_needs_a_gateway_on_the_newest_table(apps: FakeApps, board: FakeBoard) -> None:
    rec = reconciler([ModelConfig(name="m", source="m")], Store(m="1"), apps, board)
    apps.set("m", "1", AppState.RUNNING)
    rec.step()
    assert rec.serving()
    board.gateway_lags = True
    assert not rec.serving()


def test_start_up_fails_fast_when_the_first_version_cannot_start(
    apps: FakeApps, board: FakeBoard
) -> None:
    rec = reconciler([ModelConfig(name="m", source="m")], Store(m="1"), apps, board)
    apps.set("m", "1", AppState.FAILED, "no such file")
    with pytest.raises(RuntimeError, match=r"loom.m@1: no such file"):
        rec.wait_until_serving(timeout_s=60, interval_s=0)


def test_once_settled_it_asks_serve_nothing_until_an_alias_moves(
    apps: FakeApps, board: FakeBoard
) -> None:
    calls = []
    states = apps.states
    apps.states = lambda: calls.append(1) or states()  # count controller calls
    store = Store(m="1")
    rec = reconciler([ModelConfig(name="m", source="m")], store, apps, board)
    apps.set("m", "1", AppState.RUNNING)
    rec.step()  # routes 1
    rec.step()  # sees all RUNNING and nothing to do: settled
    for _ in range(5):
        rec.step()
    assert len(calls) == 2
    store.aliases["m"] = "2"
    rec.step()
    assert len(calls) == 3
    assert actions(apps)[-1] == "deploy loom.m@2"
