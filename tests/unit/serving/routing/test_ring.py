"""The consistent-hash ring's properties on 100k random keys, and its placement rules."""

from __future__ import annotations

import random

import pytest

from serving.routing.ring import (
    HashRing,
    build_ring,
    key_probes,
    moved_keys,
    place,
    place_probes,
    placements,
    shard_ids,
    shard_loads,
)

KEYS = 100_000


@pytest.fixture(scope="module")
def keys() -> list[str]:
    rng = random.Random(5)
    return [f"{rng.getrandbits(64):016x}" for _ in range(KEYS)]


@pytest.fixture(scope="module")
def probes(keys: list[str]) -> list[tuple[int, ...]]:
    """Each key hashed once; placing on many rings then costs bisects only."""
    return [key_probes(key) for key in keys]


def shards_of(ring: HashRing, probes: list[tuple[int, ...]]) -> list[str]:
    return [place_probes(ring, p) for p in probes]


@pytest.mark.parametrize("shards", [2, 4, 5, 8, 16, 32])
def test_the_busiest_shard_holds_at_most_1_25_times_the_mean(
    probes: list[tuple[int, ...]], shards: int
) -> None:
    placed = shards_of(build_ring(shard_ids(shards), virtual_nodes=64), probes)
    loads = {s: placed.count(s) for s in shard_ids(shards)}
    mean = KEYS / shards  # 4 shards: 25,000 keys each on average
    assert sum(loads.values()) == KEYS
    assert max(loads.values()) <= 1.25 * mean, loads
    assert min(loads.values()) > 0


@pytest.mark.parametrize("shards", [1, 3, 4, 8, 15])
def test_adding_a_shard_moves_at_most_its_share_plus_5_percent_all_to_the_new_shard(
    probes: list[tuple[int, ...]], shards: int
) -> None:
    before = shards_of(build_ring(shard_ids(shards)), probes)
    after = shards_of(build_ring(shard_ids(shards + 1)), probes)
    moved_to = [new for old, new in zip(before, after, strict=True) if old != new]
    # 4 -> 5 shards: the new shard's fair share is 1/5 = 20%; allowed 25% = 25,000 keys
    assert len(moved_to) <= (1 / (shards + 1) + 0.05) * KEYS
    assert len(moved_to) >= 0.5 / (shards + 1) * KEYS  # and it does take a real share
    assert set(moved_to) == {str(shards)}  # every moved key went to the new shard


def test_placing_by_key_equals_placing_by_its_probes(keys: list[str]) -> None:
    ring = build_ring(shard_ids(4))
    assert [place(ring, k) for k in keys[:500]] == [
        place_probes(ring, key_probes(k)) for k in keys[:500]
    ]


def test_removing_the_last_shard_moves_only_its_own_keys(keys: list[str]) -> None:
    five, four = build_ring(shard_ids(5)), build_ring(shard_ids(4))
    sample = keys[:20_000]
    moved = moved_keys(five, four, sample)
    assert {place(five, key) for key in moved} == {"4"}
    assert len(moved) == shard_loads(five, sample)["4"]


def test_placement_is_the_same_for_an_equal_ring_built_anywhere() -> None:
    # blake2b, not Python's per-process salted hash(): every gateway replica agrees
    one, other = build_ring(shard_ids(4)), build_ring(("0", "1", "2", "3"))
    names = [f"digits-{i}" for i in range(20)]
    assert placements(one, names) == placements(other, names)
    assert set(placements(one, names).values()) <= {"0", "1", "2", "3"}


def test_one_shard_takes_every_key() -> None:
    ring = build_ring(shard_ids(1))
    assert {place(ring, f"k{i}") for i in range(100)} == {"0"}


@pytest.mark.parametrize(
    ("shards", "virtual_nodes", "words"),
    [
        ((), 64, "at least one shard"),
        (("0", "0"), 64, "unique"),
        (("0",), 0, "virtual_nodes"),
    ],
)
def test_a_bad_ring_is_refused(shards: tuple[str, ...], virtual_nodes: int, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        build_ring(shards, virtual_nodes)


def test_shard_ids_are_stable_numbers_and_refuse_zero() -> None:
    assert shard_ids(3) == ("0", "1", "2")
    with pytest.raises(ValueError, match="at least 1 shard"):
        shard_ids(0)


def test_the_ring_has_virtual_nodes_points_per_shard_in_order() -> None:
    ring = build_ring(shard_ids(3), virtual_nodes=64)
    assert len(ring.points) == 3 * 64
    assert list(ring.points) == sorted(ring.points)
    assert {s: ring.owners.count(s) for s in ring.shards} == {"0": 64, "1": 64, "2": 64}
