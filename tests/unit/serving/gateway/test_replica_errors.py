"""A replica's refusal crosses Ray wrapped in a RayTaskError whose str() is the remote
traceback (pids, addresses): the client's message is built from the error's fields."""

from __future__ import annotations

import pytest
from ray.exceptions import RayTaskError

from serving.gateway.errors import api_error
from serving.messages import InjectedFault, Overloaded, ReplicaError

REMOTE_TRACE = "Traceback (most recent call last):\n  File replica.py, pid=4242, ip=10.0.0.7"


@pytest.mark.parametrize(
    ("error", "status", "message"),
    [
        (Overloaded("enc", 3), 503, "model enc is overloaded; retry after 3 s"),
        (InjectedFault("enc"), 503, "model enc failed the call (injected fault)"),
    ],
    ids=["overloaded", "injected-fault"],
)
def test_a_refusal_through_ray_answers_its_own_words_not_the_remote_trace(
    error: ReplicaError, status: int, message: str
) -> None:
    through_ray = RayTaskError("infer", REMOTE_TRACE, error).as_instanceof_cause()
    assert "pid=" in str(through_ray)  # what the client must never see

    answer = api_error(through_ray)

    assert answer is not None
    assert (answer.status, answer.message) == (status, message)
