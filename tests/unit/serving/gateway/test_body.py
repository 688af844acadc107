from __future__ import annotations

import pytest

from serving.gateway.body import field_path, parse_json, validate
from serving.gateway.errors import ApiError
from serving.gateway.protocols.openai import EmbeddingsRequest


def test_union_member_tags_are_left_out_of_the_field_path():
    assert field_path(("input", "str")) == "input"
    assert field_path(("input", "list[str]", 3)) == "input.3"
    assert field_path(("inputs", 0, "datatype")) == "inputs.0.datatype"


@pytest.mark.parametrize(
    ("body", "words"),
    [(b"", "empty"), (b"\xff", "UTF-8"), (b"{", "malformed JSON"), (b"[1", "malformed JSON")],
)
def test_unreadable_bodies_are_400_with_the_reason(body, words):
    with pytest.raises(ApiError) as err:
        parse_json(body)
    assert err.value.status == 400
    assert words in err.value.message


def test_schema_error_names_the_first_field_and_counts_the_rest():
    with pytest.raises(ApiError) as err:
        validate(EmbeddingsRequest, {"input": 5})
    assert err.value.status == 400
    assert err.value.param in {"model", "input"}
    assert "more problem" in err.value.message


def test_token_arrays_are_refused_with_a_reason():
    with pytest.raises(ApiError) as err:
        validate(EmbeddingsRequest, {"model": "m", "input": [1, 2]})
    assert "token arrays" in err.value.message
    assert err.value.param == "input"
