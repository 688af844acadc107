"""A replica's own input check answers 400 (InputRefused), not a 500, when a canary version
takes another shape than the one the gateway checked against."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from serving.messages import InputRefused
from serving.replicas.core import check_row_inputs


class TensorEngine:
    input_kind = "tensor"

    def check_input(self, batch: np.ndarray) -> None:
        if batch.shape[1:] != (64,):
            raise ValueError(f"input must have shape [n, 64], got {list(batch.shape)}")


class TextEngine:
    input_kind = "text"


class Embedder:
    """No ``input_kind``: an embedding model takes texts."""


def test_rows_of_the_wrong_width_are_refused_with_the_engines_reason():
    with pytest.raises(InputRefused, match=r"shape \[n, 64\], got \[2, 32\]"):
        check_row_inputs(TensorEngine(), np.zeros((2, 32), dtype=np.float32))


def test_tensor_rows_sent_to_a_text_classifier_are_refused():
    with pytest.raises(InputRefused, match="list of strings"):
        check_row_inputs(TextEngine(), [[0.0] * 64])


def test_rows_sent_to_an_embedder_are_refused():
    with pytest.raises(InputRefused, match="text model takes a list of strings"):
        check_row_inputs(Embedder(), np.zeros((1, 64), dtype=np.float32))


def test_good_inputs_pass():
    check_row_inputs(TensorEngine(), np.zeros((3, 64), dtype=np.float32))
    check_row_inputs(TextEngine(), ["a review", "another"])
    check_row_inputs(Embedder(), ["a sentence"])


def test_the_refusal_survives_the_hop_back_through_ray():
    # Ray pickles a replica's exception to hand it to the caller
    again = pickle.loads(pickle.dumps(InputRefused("input must be FP32")))
    assert isinstance(again, InputRefused)
    assert again.message == "input must be FP32"
