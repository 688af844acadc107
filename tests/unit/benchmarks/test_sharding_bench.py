"""The sharding benchmark's pure parts: its config is one Loom accepts, the load counter is
read per member, and requests spread over every model."""

from __future__ import annotations

from collections import Counter

from benchmarks.sharding import (
    SETUPS,
    loads_by_model,
    loads_of,
    member_names,
    mixed_requests,
    server_config,
)
from serving.config import parse_config


def test_the_three_setups_make_one_valid_config_with_distinct_members() -> None:
    config = parse_config(server_config(8123, models=24, budget=8))
    pools = {m.name: m for m in config.models}
    assert set(pools) == {"one-shard", "one-shard-4-replicas", "four-shards"}
    assert pools["four-shards"].sharding.shards == 4
    assert pools["one-shard"].sharding is None
    assert pools["one-shard-4-replicas"].replicas == 4
    assert all(len(p.multiplex.models) == 24 for p in pools.values())
    assert len(config.served_names()) == 3 * 24  # no member name shared between set-ups


def test_loads_are_read_per_member_and_summed_per_setup() -> None:
    page = (
        "# HELP loom_model_loads_total Models loaded\n"
        'loom_model_loads_total{model="one-0"} 3.0\n'
        'loom_model_loads_total{model="one-1"} 2.0\n'
        'loom_model_loads_total{model="four-0"} 1.0\n'
        'loom_model_loads_created{model="one-0"} 1.7e+09\n'
    )
    loads = loads_by_model(page)
    assert loads == {"one-0": 3.0, "one-1": 2.0, "four-0": 1.0}
    assert loads_of(loads, member_names(SETUPS[0], 24)) == 5.0  # 3 + 2


def test_mixed_requests_name_every_model_about_equally() -> None:
    names = member_names(SETUPS[2], 8)
    requests = mixed_requests(8123, names, b"{}", 8000, seed=1)
    paths = Counter(r.split(b" ", 2)[1].decode() for r in requests)
    assert set(paths) == {f"/v2/models/{n}/infer" for n in names}
    assert max(paths.values()) < 1.2 * 1000  # 8000 over 8 models: ~1000 each
