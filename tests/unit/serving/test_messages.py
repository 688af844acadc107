"""What crosses the hop: every reply is ``Rows`` (len, slice, concat), a call joins its
requests' inputs as parts, a reply gives each part its rows, and every exception a replica
answers with survives Ray's pickling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from serving.messages import (
    ClassifyReply,
    DeadlineExceeded,
    EmbedReply,
    Envelope,
    GenerationRefused,
    InferCall,
    InferReply,
    InjectedFault,
    InputRefused,
    Overloaded,
    concat_rows,
    pack_inputs,
)

FEATURES = 64


def test_a_reply_cut_into_rows_keeps_its_version_and_only_those_rows():
    reply = ClassifyReply(probabilities=np.arange(12, dtype=np.float32).reshape(4, 3), version="2")
    part = reply.slice(1, 3)
    assert part.version == "2"
    assert part.probabilities.tolist() == [[3, 4, 5], [6, 7, 8]]


def test_feature_rows_are_packed_into_one_array_and_texts_stay_a_list():
    rows = list(np.arange(2 * FEATURES, dtype=np.float32).reshape(2, FEATURES))
    packed = pack_inputs(rows)
    assert isinstance(packed, np.ndarray)
    assert packed.shape == (2, FEATURES)
    assert packed[1, 0] == 64.0
    assert pack_inputs(["a", "b"]) == ["a", "b"]


def test_embeddings_cut_and_join_with_their_token_counts():
    reply = EmbedReply(np.eye(4, dtype=np.float32), (1, 2, 3, 4), "7")
    head, tail = reply.slice(0, 1), reply.slice(1, 4)
    assert (len(head), len(tail)) == (1, 3)
    joined = concat_rows([head, tail])
    assert joined.token_counts == (1, 2, 3, 4)
    assert np.array_equal(joined.vectors, reply.vectors)
    assert concat_rows([reply]) is reply  # one part: no copy


def test_a_joined_call_keeps_each_requests_inputs_and_envelope_in_order():
    a, b = Envelope("a", deadline_s=10.0), Envelope("b", shard_key="user-7")
    call = InferCall.join([(a, ["x", "y"]), (b, ["z"])])
    assert call.inputs == ["x", "y", "z"]
    assert [(p.envelope.request_id, p.count) for p in call.parts] == [("a", 2), ("b", 1)]
    assert call.part_inputs() == [["x", "y"], ["z"]]
    rows = list(np.zeros((3, FEATURES), dtype=np.float32))
    packed = InferCall.join([(a, rows[:2]), (b, rows[2:])])
    assert isinstance(packed.inputs, np.ndarray)  # one buffer over the hop
    assert [len(x) for x in packed.part_inputs()] == [2, 1]


def test_a_reply_gives_each_part_its_rows_and_none_to_a_skipped_one():
    rows = ClassifyReply(np.arange(6, dtype=np.float32).reshape(3, 2), "1")
    whole = InferReply(rows)
    first, second = whole.part_rows([2, 1])
    assert first is not None
    assert second is not None
    assert first.probabilities.tolist() == [[0, 1], [2, 3]]
    assert second.probabilities.tolist() == [[4, 5]]
    # part 0 (2 inputs) expired before the engine ran: the rows are part 1's and part 2's
    skipped = InferReply(rows, skipped=frozenset({0}))
    parts = skipped.part_rows([2, 1, 2])
    assert parts[0] is None
    assert [len(p) for p in parts[1:] if p is not None] == [1, 2]
    assert InferReply(None, frozenset({0})).part_rows([1]) == [None]


def test_an_envelope_knows_how_long_it_has_left():
    envelope = Envelope("r", deadline_s=100.0)
    assert envelope.remaining_s(now_s=98.5) == 1.5
    assert not envelope.expired(now_s=99.9)
    assert envelope.expired(now_s=100.0)
    assert not Envelope("no-deadline").expired()


@pytest.mark.parametrize(
    "error",
    [
        Overloaded("m", 3),
        InputRefused("input must be FP32"),
        GenerationRefused("the prompt is empty", param="prompt"),
        InjectedFault("m"),
        DeadlineExceeded("m", "r-1"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_every_replica_error_survives_the_hop_back_through_ray(error: Exception):
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error)
    assert vars(again) == vars(error)
    assert str(again) == str(error)
