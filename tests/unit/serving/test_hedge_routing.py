"""Which replicas a hedged call may go to (``serving.hedge_routing.hedge_candidates``): the
duplicate skips its first call's replica whenever there is another."""

from __future__ import annotations

import pytest

from serving.hedge_routing import HEDGE_GROUP_PREFIX, hedge_candidates, hedge_group


@pytest.mark.parametrize(
    ("candidates", "avoid", "widest", "expected"),
    [
        ({"a", "b"}, None, True, {"a", "b"}),  # no group, or the group's first call
        ({"a", "b"}, "a", True, {"b"}),  # the duplicate: the other replica
        ({"a", "b", "c"}, "b", True, {"a", "c"}),  # two left: power of two choices on them
        ({"a", "b"}, "z", True, {"a", "b"}),  # first call's replica gone: any
        ({"a"}, "a", True, {"a"}),  # one replica in all: it, or no duplicate at all
        ({"a"}, "a", False, set()),  # only it on this node: wait for the round over all
        ({"a", "b"}, "a", False, {"b"}),  # another on this node: that one
    ],
)
def test_a_duplicate_skips_its_first_calls_replica_when_another_is_there(
    candidates: set[str], avoid: str | None, widest: bool, expected: set[str]
) -> None:
    assert hedge_candidates(candidates, avoid, widest=widest) == expected


def test_each_member_call_gets_a_group_of_its_own() -> None:
    groups = {hedge_group() for _ in range(1000)}
    assert len(groups) == 1000
    assert all(g.startswith(HEDGE_GROUP_PREFIX) for g in groups)
