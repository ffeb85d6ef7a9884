"""The α-β model against a case computed by hand."""

from __future__ import annotations

import math

import pytest

from trainers.commodel import Link, StepCosts, predict

COSTS = StepCosts(compute_s=0.01, batch=100, cores=4, exchange_bytes=1e6, average_bytes=4e6,
                  sync_every=10, push_bytes=2e6, server_s=0.002)  # fmt: skip
LINK = Link(latency_s=1e-3, bandwidth=1e8)  # a message of B bytes: 1 ms + B / 100 MB/s


def test_the_alpha_beta_model_by_hand():
    one = predict(COSTS, LINK, "sync", 1)  # no one to talk to: the step itself
    assert (one.step_s, one.samples_per_s, one.efficiency) == pytest.approx((0.01, 10_000, 1.0))
    # sync, 4 workers: 3 rounds of the all-gather, each 1 ms + 1 MB / 100 MB/s = 11 ms
    four = predict(COSTS, LINK, "sync", 4)
    assert four.step_s == pytest.approx(0.01 + 3 * 0.011)
    assert four.samples_per_s == pytest.approx(400 / 0.043)
    assert four.efficiency == pytest.approx(400 / 0.043 / 40_000)
    # 8 workers on 4 cores: each step computes twice as long
    assert predict(COSTS, LINK, "sync", 8).step_s == pytest.approx(0.02 + 7 * 0.011)
    # local SGD, 4 workers: 6 messages of 1 MB (4 MB / 4) every 10 steps
    local = predict(COSTS, LINK, "local_sgd", 4)
    assert local.step_s == pytest.approx(0.01 + 6 * 0.011 / 10)
    assert local.samples_per_s == pytest.approx(400 / 0.0166)
    # async, a server and 3 workers: a cycle of 10 + 2 x 1 + 20 + 2 ms = 34 ms lets the workers
    # push 88 times a second, but the server takes 2 + 20 ms a push: 45.45 a second
    stale = predict(COSTS, LINK, "async", 4)
    assert stale.step_s == pytest.approx(0.034)
    assert stale.samples_per_s == pytest.approx(100 / 0.022)
    assert stale.efficiency == pytest.approx(100 / 0.022 / 40_000)
    # with a fast server the workers' cycles bind instead
    quick = predict(StepCosts(**{**COSTS.__dict__, "push_bytes": 0.0, "server_s": 0.0}), LINK,
                    "async", 4)  # fmt: skip
    assert quick.samples_per_s == pytest.approx(100 * 3 / 0.012)
    assert math.isnan(predict(COSTS, LINK, "async", 1).samples_per_s)  # no worker besides
    with pytest.raises(ValueError, match="mode"):
        predict(COSTS, LINK, "ring", 2)
