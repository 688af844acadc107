"""Multiplexed pools: config validation, member -> pool mapping, one routed entry per pool,
and the gateway sending a member's requests to its pool's handle naming the member."""

from __future__ import annotations

import pytest
from rollout_fakes import FakeApps, FakeBoard, Store, actions, reconciler

from serving.config import POOL_VERSION, ConfigError, ModelConfig, PoolMember, parse_config
from serving.gateway.core import GatewayCore
from serving.gateway.errors import ApiError
from serving.messages import Envelope
from serving.rollout.plan import AppState, follows_alias
from serving.rollout.route_table import RouteFollower, RouteTable, VersionRoute


def pool(**overrides: object) -> dict:
    return {
        "name": "digits-pool",
        "task": "classify",
        "multiplex": {"models": ["digits-a@1", "digits-b@2"], "max_models_per_replica": 2},
        **overrides,
    }


def config(*models: dict):
    return parse_config({"models": list(models)})


def test_a_pool_maps_each_member_by_store_name_to_its_pinned_ref_and_pool():
    loom = config(pool(), {"name": "plain", "source": "minilm"})

    assert loom.pool_members() == {
        "digits-a": PoolMember("digits-a", "digits-a@1", "digits-pool"),
        "digits-b": PoolMember("digits-b", "digits-b@2", "digits-pool"),
    }
    assert loom.served_names() == ("plain", "digits-a", "digits-b")  # not the pool's name
    member = loom.served("digits-b")
    assert isinstance(member, ModelConfig)  # a plain model: its pool is the routed entry
    assert (member.name, member.source, member.task) == ("digits-b", "digits-b@2", "classify")
    assert loom.served("digits-pool") is None  # a pool's own name is not callable
    assert loom.model("digits-pool").multiplex.max_models_per_replica == 2
    assert not follows_alias(loom.model("digits-pool"))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (pool(task="generate"), "serves task classify or embed"),
        (pool(source="digits-a@1"), "not source or traffic"),
        (pool(multiplex={"models": ["digits-a"]}), "must be pinned: NAME@VERSION"),
        (pool(multiplex={"models": ["digits-a#serving"]}), "must be pinned"),
        (pool(multiplex={"models": ["digits-a@1", "digits-a@2"]}), "repeated: digits-a"),
        (pool(multiplex={"models": []}), "at least 1 item"),
        (pool(multiplex={"models": ["../x@1"]}), "models.0.multiplex.models"),
        (pool(multiplex={"models": ["a@1"], "max_models_per_replica": 0}), "greater than"),
        ({"name": "no-source", "task": "classify"}, "source is required"),
    ],
)
def test_an_invalid_pool_is_refused_naming_why(model: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        config(model)


def test_member_names_may_not_clash_with_model_names_or_other_pools_members():
    with pytest.raises(ConfigError, match="repeated: digits-a"):
        config(pool(), {"name": "digits-a", "source": "digits", "task": "classify"})
    other = pool(name="other-pool", multiplex={"models": ["digits-a@3"]})
    with pytest.raises(ConfigError, match="repeated: digits-a"):
        config(pool(), other)


def test_a_pool_is_one_routed_entry_deployed_like_a_pinned_model():
    apps = FakeApps()
    board = FakeBoard(apps)
    loom = config(pool())
    rec = reconciler(list(loom.models), Store(), apps, board)
    rec.step()
    apps.set("digits-pool", POOL_VERSION, AppState.RUNNING)
    rec.step()
    rec.step()

    assert actions(apps) == ["deploy loom.digits-pool@pool", "publish digits-pool=poolx1"]


class FakeHandle:
    def __init__(self, name: str, model_id: str = "") -> None:
        self.name, self.model_id = name, model_id

    def options(self, *, multiplexed_model_id: str) -> FakeHandle:
        return FakeHandle(self.name, multiplexed_model_id)


def test_the_gateway_sends_a_member_to_its_pools_app_naming_the_member():
    loom = config(pool(), {"name": "plain", "source": "minilm"})
    follower = RouteFollower(lambda *_: None)
    pool_route = VersionRoute("digits-pool", "pool", 1.0, "loom.digits-pool@pool", FakeHandle("p"))
    plain_route = VersionRoute("plain", "1", 1.0, "loom.plain@1", FakeHandle("m"))
    follower.table = RouteTable(1, {"digits-pool": (pool_route,), "plain": (plain_route,)})
    gw = GatewayCore(loom, follower, store=None)

    route = gw.route("digits-b", Envelope("r-1"))
    assert (route.model, route.app_name) == ("digits-b", "loom.digits-pool@pool")
    assert (route.handle.name, route.handle.model_id) == ("p", "digits-b@2")
    # one handle per member, reused
    assert gw.route("digits-b", Envelope("r-1")).handle is route.handle
    assert gw.route("plain", Envelope("r-2")) is plain_route
    assert gw.routed_name("digits-a") == "digits-pool"
    assert gw.model("digits-a").limits == loom.model("digits-pool").limits
    with pytest.raises(ApiError, match="digits-pool") as refused:
        gw.model("digits-pool")  # the pool's name is not callable
    assert refused.value.status == 404
