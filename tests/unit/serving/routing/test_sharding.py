"""Sharded services without a cluster: the config's rules, the reconciler starting, moving and
resharding shards (against the fakes of rollout_fakes), the gateway's shard placement over a
route table, and readiness folding shards into their model."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from rollout_fakes import FakeApps, FakeBoard, Store, actions, reconciler

from serving.config import ConfigError, LoomConfig, ModelConfig, PoolConfig, parse_config
from serving.config.sharding import ShardingConfig
from serving.gateway.core import GatewayCore
from serving.gateway.readiness import fold_shards, version_label
from serving.messages import Envelope
from serving.rollout.plan import AppState, plan_rollout
from serving.rollout.route_table import RouteFollower, RouteTable, VersionRoute
from serving.routing.ring import build_ring, place
from serving.routing.shard_router import ShardRouter
from serving.routing.sharding import (
    base_model,
    parse_shard_entry,
    routed_shards,
    shard_entry,
    shard_key,
)

POOL_MEMBERS = [f"digits-{i}@1" for i in range(20)]


def pool(shards: int = 4, key: str = "model") -> PoolConfig:
    return PoolConfig(
        name="digits-pool",
        task="classify",
        multiplex={"models": POOL_MEMBERS, "max_models_per_replica": 8},
        sharding={"shards": shards, "key": key},
    )


def minilm_by_header(shards: int = 2) -> ModelConfig:
    return ModelConfig(name="minilm", source="minilm", sharding={"shards": shards, "key": "header"})


# ---- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ({"name": "m", "source": "m", "sharding": {"shards": 2}}, "needs a pool"),
        ({"name": "m", "source": "m", "sharding": {"shards": 0, "key": "header"}}, "shards"),
        ({"name": "m", "source": "m", "sharding": {"shards": 65, "key": "header"}}, "shards"),
        ({"name": "m", "source": "m", "sharding": {"shards": 2, "key": "user"}}, "key"),
        (
            {
                "name": "m",
                "source": "m",
                "traffic": {"1": 1},
                "sharding": {"shards": 2, "key": "header"},
            },
            "traffic split",
        ),
    ],
)
def test_a_bad_sharding_section_is_refused_naming_the_field(entry: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as caught:
        parse_config({"models": [entry]})
    assert "models.0" in str(caught.value)


def test_a_sharded_pool_and_a_header_sharded_model_are_accepted_with_64_virtual_nodes() -> None:
    config = parse_config({"models": [pool().model_dump(), minilm_by_header().model_dump()]})
    assert config.model("digits-pool").sharding == ShardingConfig(shards=4, key="model")
    assert config.model("minilm").sharding.virtual_nodes == 64


# ---- names and keys ---------------------------------------------------------------------------


def test_shard_entries_parse_back_and_plain_names_are_not_shards() -> None:
    assert shard_entry("digits-pool", "3") == "digits-pool~3"
    assert parse_shard_entry("digits-pool~3") == ("digits-pool", "3")
    assert parse_shard_entry("minilm") is None
    assert base_model("digits-pool~3") == "digits-pool"
    assert base_model("minilm") == "minilm"
    assert routed_shards("m", {"m~10": 1, "m~2": 1, "m~0": 1, "n~1": 1, "m": 1}) == ("0", "2", "10")


@pytest.mark.parametrize(
    ("key", "header", "expected"),
    [
        ("model", "user-7", "digits-3"),  # a pool places by the called member, whatever the header
        ("header", "user-7", "user-7"),
        ("header", None, "req-1"),  # no header: the request id spreads keyless traffic
        ("header", "", "req-1"),
    ],
)
def test_the_shard_key_is_the_model_name_or_the_header_or_the_request_id(
    key: str, header: str | None, expected: str
) -> None:
    sharding = ShardingConfig(shards=2, key=key)
    assert shard_key(sharding, model="digits-3", header=header, request_id="req-1") == expected


# ---- the reconciler ---------------------------------------------------------------------------


def test_each_shard_is_its_own_app_routed_once_it_runs_and_serving_waits_for_all(
    apps: FakeApps, board: FakeBoard
) -> None:
    rec = reconciler([pool(shards=3)], Store(), apps, board)
    rec.step()
    assert actions(apps) == [f"deploy loom.digits-pool~{k}@pool" for k in range(3)]
    for k in (0, 1):
        apps.set(f"digits-pool~{k}", "pool", AppState.RUNNING)
    rec.step()
    # the ring covers the shards that run (a pool's shard can load any member); start-up
    # (wait_until_serving) still waits for all three
    assert set(rec.routed) == {"digits-pool~0", "digits-pool~1"}
    assert not rec.serving()
    apps.set("digits-pool~2", "pool", AppState.RUNNING)
    rec.step()
    assert set(rec.routed) == {"digits-pool~0", "digits-pool~1", "digits-pool~2"}
    assert rec.serving()


def test_resharding_up_starts_the_new_shard_and_routes_it_only_once_it_runs(
    apps: FakeApps, board: FakeBoard
) -> None:
    rec = reconciler([pool(shards=2)], Store(), apps, board)
    rec.step()
    for k in (0, 1):
        apps.set(f"digits-pool~{k}", "pool", AppState.RUNNING)
    rec.step()
    apps.log.clear()

    board.shard_counts["digits-pool"] = 3  # POST /v1/admin/shards/digits-pool {"shards": 3}
    rec.step()
    rec.step()
    assert actions(apps) == ["deploy loom.digits-pool~2@pool"]
    assert set(rec.routed) == {"digits-pool~0", "digits-pool~1"}  # the ring has not moved
    apps.set("digits-pool~2", "pool", AppState.RUNNING)
    rec.step()
    assert set(rec.routed) == {"digits-pool~0", "digits-pool~1", "digits-pool~2"}
    assert not any(line.startswith("delete") for line in actions(apps))
    assert any("resharding 2 -> 3" in line for line in apps.log)


def test_resharding_down_unroutes_the_last_shard_then_deletes_it_after_the_gateways_drain(
    apps: FakeApps, board: FakeBoard
) -> None:
    rec = reconciler([pool(shards=3)], Store(), apps, board)
    rec.step()
    for k in range(3):
        apps.set(f"digits-pool~{k}", "pool", AppState.RUNNING)
    rec.step()
    apps.log.clear()

    board.shard_counts["digits-pool"] = 2
    rec.step()  # (publishing waits for every gateway to drain shard 2: test_reconciler)
    assert actions(apps) == ["publish digits-pool~0=poolx1 digits-pool~1=poolx1"]
    rec.step()
    assert actions(apps)[-1] == "delete loom.digits-pool~2@pool"


def test_a_sharded_model_following_an_alias_moves_every_shard_to_the_new_version(
    apps: FakeApps, board: FakeBoard
) -> None:
    store = Store(minilm="1")
    rec = reconciler([minilm_by_header(shards=2)], store, apps, board)
    rec.step()
    for k in (0, 1):
        apps.set(f"minilm~{k}", "1", AppState.RUNNING)
    rec.step()
    store.aliases["minilm"] = "2"
    rec.step()
    assert {line for line in actions(apps) if "@2" in line} == {
        "deploy loom.minilm~0@2",
        "deploy loom.minilm~1@2",
    }
    for k in (0, 1):
        apps.set(f"minilm~{k}", "2", AppState.RUNNING)
    rec.step()
    rec.step()
    assert rec.routed == {"minilm~0": {"2": 1.0}, "minilm~1": {"2": 1.0}}
    assert {line for line in actions(apps) if line.startswith("delete")} == {
        "delete loom.minilm~0@1",
        "delete loom.minilm~1@1",
    }


def test_a_reshard_request_for_an_unsharded_model_is_ignored(
    apps: FakeApps, board: FakeBoard
) -> None:
    rec = reconciler([pool(shards=2), ModelConfig(name="m", source="m")], Store(m="1"), apps, board)
    board.shard_counts["m"] = 4  # the admin route refuses this (409); the reconciler ignores it
    rec.step()
    assert rec.shards == {"digits-pool": 2}
    assert "deploy loom.m@1" in actions(apps)


def test_the_plan_drops_an_entry_no_longer_desired_then_deletes_its_app() -> None:
    routed = {"m~0": {"1": 1.0}, "m~1": {"1": 1.0}}
    from serving.rollout.plan import VersionKey

    apps = {VersionKey("m~0", "1"): AppState.RUNNING, VersionKey("m~1", "1"): AppState.RUNNING}
    plan = plan_rollout({"m~0": {"1": 1.0}}, routed, apps)
    assert plan.routes == {"m~0": {"1": 1.0}}
    assert plan.delete == ()  # still routed now: deleted on the next plan
    later = plan_rollout({"m~0": {"1": 1.0}}, plan.routes, apps)
    assert later.delete == (VersionKey("m~1", "1"),)


# ---- the gateway's placement ------------------------------------------------------------------


def table(epoch: int, *entries: str) -> RouteTable:
    routes = {e: (VersionRoute(e, "pool", 1.0, f"loom.{e}@pool", None),) for e in entries}
    return RouteTable(epoch=epoch, routes=routes)


def test_the_router_places_by_the_ring_over_the_shards_routed_now() -> None:
    current = {"table": table(1, "digits-pool~0", "digits-pool~1", "other")}
    router = ShardRouter({"digits-pool": ShardingConfig(shards=2)}, lambda: current["table"])
    ring = build_ring(("0", "1"))
    names = [f"digits-{i}" for i in range(20)]
    assert [router.entry("digits-pool", n) for n in names] == [
        f"digits-pool~{place(ring, n)}" for n in names
    ]
    assert router.entry("other", "anything") == "other"  # not sharded: itself

    current["table"] = table(2, "digits-pool~0", "digits-pool~1", "digits-pool~2")
    three = build_ring(("0", "1", "2"))
    assert [router.entry("digits-pool", n) for n in names] == [
        f"digits-pool~{place(three, n)}" for n in names
    ]


def test_the_router_says_not_routed_while_no_shard_runs() -> None:
    router = ShardRouter({"digits-pool": ShardingConfig(shards=2)}, lambda: table(1, "x"))
    assert router.entry("digits-pool", "digits-1") is None  # the gateway answers 503


def test_the_shard_map_lists_each_shard_with_its_app_and_keys() -> None:
    router = ShardRouter(
        {"digits-pool": ShardingConfig(shards=2)},
        lambda: table(4, "digits-pool~0", "digits-pool~1"),
    )
    names = [f"digits-{i}" for i in range(10)]
    shard_map = router.shard_map("digits-pool", names)
    assert shard_map["routed_shards"] == 2
    assert shard_map["epoch"] == 4
    assert shard_map["shards"]["1"]["apps"] == ["loom.digits-pool~1@pool"]
    placed = shard_map["shards"]["0"]["keys"] + shard_map["shards"]["1"]["keys"]
    assert sorted(placed) == sorted(names)  # each key on exactly one shard


# ---- readiness --------------------------------------------------------------------------------


def test_readiness_folds_each_shard_into_its_model() -> None:
    assert version_label("m~2", "1") == ("m", "1~2")
    assert version_label("minilm", "3") == ("minilm", "3")
    assert fold_shards({"m~0": {"1": 1.0}, "m~1": {"1": 1.0}, "n": {"2": 1.0}}) == {
        "m": {"1~0": 1.0, "1~1": 1.0},
        "n": {"2": 1.0},
    }


def test_each_request_the_gateway_places_counts_on_its_shard() -> None:
    loom = LoomConfig(models=[minilm_by_header(shards=2)])
    follower = RouteFollower(lambda *_: None)
    follower.table = table(1, "minilm~0", "minilm~1")
    gw = GatewayCore(loom, follower, store=None)
    keys = [f"user-{i}" for i in range(200)]
    ring = build_ring(("0", "1"))

    def counted(shard: str) -> float:
        labels = {"model": "minilm", "shard": shard}
        return REGISTRY.get_sample_value("loom_shard_requests_total", labels) or 0.0

    before = {shard: counted(shard) for shard in ("0", "1")}
    for key in keys:
        gw.route("minilm", Envelope(f"r-{key}", shard_key=key))

    placed = [place(ring, key) for key in keys]
    assert {s: counted(s) - before[s] for s in ("0", "1")} == {
        s: placed.count(s) for s in ("0", "1")
    }  # every request on exactly one shard: 200 in all
