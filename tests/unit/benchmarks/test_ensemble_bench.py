"""The ensemble benchmark's configs: valid Loom configs, the straggler 10 x its p50 on 5% of
calls, and the two straggler ensembles differing only in hedging."""

from __future__ import annotations

import numpy as np
import orjson

from benchmarks.ensemble import STRAGGLER, clean_config, infer_bodies, straggler_config
from serving.config import parse_config


def test_the_clean_config_serves_three_members_and_their_mean_ensemble():
    loom = parse_config(clean_config(port=8123))

    assert [m.name for m in loom.deployed()] == ["digits-mlp", "digits-cnn", "digits-mlp2"]
    assert loom.served("digits").ensemble.combine == "mean"
    assert all(m.faults is None for m in loom.deployed())
    assert [e.name for e in loom.ensembles()] == ["digits"]


def test_the_straggler_is_ten_times_its_p50_on_five_percent_of_calls_and_only_hedging_differs():
    loom = parse_config(straggler_config(port=8123, member_p50_ms=12.5))

    faults = loom.served(STRAGGLER).faults
    assert (faults.delay_ms, faults.delay_probability) == (125.0, 0.05)  # 10 x 12.5 ms
    unhedged, hedged = loom.served("digits-unhedged"), loom.served("digits-hedged")
    assert (unhedged.ensemble.hedge_at_p95, unhedged.ensemble.hedge_after_ms) == (False, None)
    assert (hedged.ensemble.hedge_at_p95, hedged.ensemble.hedge_after_ms) == (True, 25.0)
    assert hedged.ensemble.members == unhedged.ensemble.members
    fixed = loom.served("digits-hedged-fixed").ensemble
    assert (fixed.hedge_at_p95, fixed.hedge_after_ms) == (False, 25.0)  # 2 x 12.5 ms


def test_each_body_is_one_row_of_64_pixels():
    (body,) = infer_bodies(np.ones((1, 64), dtype=np.float32))

    tensor = orjson.loads(body)["inputs"][0]
    assert (tensor["shape"], len(tensor["data"])) == ([1, 64], 64)
