"""Open Inference Protocol v2 for classifiers: parsing FP32 rows, responses, metadata."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from serving.gateway.errors import ApiError
from serving.gateway.protocols import v2
from serving.messages import ClassifyReply

FEATURES = 64


def request(tensor: dict, *more: dict) -> v2.V2Infer:
    return v2.V2Infer(body=v2.InferRequest.model_validate({"inputs": [tensor, *more]}))


def pixels(shape: list[int], data: list, *, name: str = "input", dtype: str = "FP32") -> dict:
    return {"name": name, "datatype": dtype, "shape": shape, "data": data}


def rows_of(tensor: dict, *, max_rows: int = 8) -> np.ndarray:
    return v2.tensor_rows(request(tensor), features=FEATURES, max_rows=max_rows)


def refused(tensor: dict, *, max_rows: int = 8) -> ApiError:
    with pytest.raises(ApiError) as caught:
        rows_of(tensor, max_rows=max_rows)
    return caught.value


def test_flat_row_major_data_becomes_an_n_by_64_fp32_array():
    data = list(range(2 * FEATURES))  # ints are fine FP32 values: 0..127
    rows = rows_of(pixels([2, FEATURES], data))
    assert rows.dtype == np.float32
    assert rows.shape == (2, FEATURES)
    assert rows[1, 0] == 64.0  # row-major: row 1 starts at element 64
    assert rows[1, 63] == 127.0


def test_nested_data_is_read_in_the_same_row_major_order():
    nested = [[float(r * FEATURES + c) for c in range(FEATURES)] for r in range(3)]
    flat = [x for row in nested for x in row]
    assert np.array_equal(rows_of(pixels([3, FEATURES], nested)), rows_of(pixels([3, 64], flat)))


@pytest.mark.parametrize(
    ("tensor", "words"),
    [
        (pixels([1, FEATURES], [0.0] * FEATURES, name="pixels"), "named 'input'"),
        (pixels([1, FEATURES], [0.0] * FEATURES, dtype="FP64"), "datatype FP32, got FP64"),
        (pixels([1, FEATURES], ["0"] * FEATURES, dtype="BYTES"), "datatype FP32, got BYTES"),
        (pixels([FEATURES], [0.0] * FEATURES), "shape [n, 64], got [64]"),
        (pixels([1, 8, 8], [0.0] * FEATURES), "shape [n, 64], got [1, 8, 8]"),
        (pixels([2, 63], [0.0] * 126), "shape [n, 64], got [2, 63]"),
        (pixels([0, FEATURES], []), "at least one row"),
        (pixels([-1, FEATURES], [0.0] * FEATURES), "at least one row"),
    ],
)
def test_wrong_name_datatype_or_shape_is_a_400_naming_the_problem(tensor, words):
    error = refused(tensor)
    assert error.status == 400
    assert words in error.message


def test_two_inputs_are_refused_even_if_one_is_right():
    good = pixels([1, FEATURES], [0.0] * FEATURES)
    with pytest.raises(ApiError, match="exactly one input") as caught:
        v2.tensor_rows(request(good, good), features=FEATURES, max_rows=8)
    assert caught.value.status == 400


@pytest.mark.parametrize("count", [2 * FEATURES - 1, 2 * FEATURES + 1, 0])
def test_data_length_other_than_the_product_of_the_shape_is_a_400(count):
    error = refused(pixels([2, FEATURES], [1.0] * count))
    assert error.status == 400
    # 2 x 64 = 128 elements expected
    assert f"128 elements) but {count} data elements" in error.message


def test_more_rows_than_max_inputs_is_a_413_like_too_many_texts():
    error = refused(pixels([9, FEATURES], [0.0] * 9 * FEATURES), max_rows=8)
    assert error.status == 413
    assert error.code == "too_many_inputs"
    assert "9 rows exceed the limit of 8" in error.message


def test_a_huge_declared_shape_is_refused_before_any_array_is_built(monkeypatch):
    def no_arrays(*args: object, **kwargs: object) -> None:
        raise AssertionError("an array was built before the shape was checked")

    monkeypatch.setattr(v2.np, "array", no_arrays)
    # 10**9 x 64 floats would be 256 GB; the row limit stops it with the data left unread
    assert refused(pixels([10**9, FEATURES], [])).status == 413
    assert refused(pixels([2, FEATURES], [0.0] * 3)).status == 400


@pytest.mark.parametrize(
    "bad", ["7", None, True, {"x": 1}], ids=["string", "null", "bool", "object"]
)
def test_data_that_is_not_numbers_is_a_400(bad):
    error = refused(pixels([1, FEATURES], [0.0] * (FEATURES - 1) + [bad]))
    assert error.status == 400
    assert "must be numbers" in error.message


@pytest.mark.parametrize("value", [1e39, -1e39, 10**400, float("inf"), float("nan")])
def test_values_outside_finite_fp32_are_a_400(value):
    error = refused(pixels([1, FEATURES], [0.0] * (FEATURES - 1) + [value]))
    assert error.status == 400
    assert "finite FP32" in error.message


def test_classify_response_is_one_fp32_output_of_n_by_classes_in_row_major_order():
    probabilities = np.array([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]], dtype=np.float32)
    reply = ClassifyReply(probabilities=probabilities, version="3")
    body = orjson.loads(v2.reply_answer(reply, model="sentiment", request_id="r1").content)
    assert body == {
        "model_name": "sentiment",
        "model_version": "3",
        "id": "r1",
        "outputs": [
            {
                "name": "probabilities",
                "shape": [3, 2],
                "datatype": "FP32",
                "data": [0.25, 0.75, 0.5, 0.5, 1.0, 0.0],
            }
        ],
    }


def test_metadata_of_a_tensor_classifier_lists_its_fp32_input_and_labelled_output():
    meta = v2.classifier_metadata(
        "digits", ["1"], "loom-classify", features=64, labels=[str(d) for d in range(10)]
    )
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"] == [
        {
            "name": "probabilities",
            "datatype": "FP32",
            "shape": [-1, 10],
            "parameters": {"labels": ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]},
        }
    ]


def test_metadata_of_a_text_classifier_lists_its_text_input_and_label_names():
    meta = v2.classifier_metadata(
        "sentiment", ["2"], "loom-classify", features=None, labels=["negative", "positive"]
    )
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    (output,) = meta["outputs"]
    assert output["shape"] == [-1, 2]
    assert output["parameters"] == {"labels": ["negative", "positive"]}
