"""The α-β model against cases computed by hand."""

from __future__ import annotations

import dataclasses
import math

import pytest

from trainers.commodel import Link, StepCosts, fitted_links, predict

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
    # 8 workers on 4 cores: two processes a core, so the whole step takes twice as long
    assert predict(COSTS, LINK, "sync", 8).step_s == pytest.approx(2 * (0.01 + 7 * 0.011))
    # local SGD, 4 workers: 6 messages of 1 MB (4 MB / 4) every 10 steps
    local = predict(COSTS, LINK, "local_sgd", 4)
    assert local.step_s == pytest.approx(0.01 + 6 * 0.011 / 10)
    assert local.samples_per_s == pytest.approx(400 / 0.0166)
    # async, a server and 3 workers: a cycle of 10 + 8 x 1 + 20 + 2 ms = 40 ms lets the workers
    # push 75 times a second, but the server is busy 2 + 7 x 1 + 20 ms a push: 34.5 a second
    stale = predict(COSTS, LINK, "async", 4)
    assert stale.step_s == pytest.approx(0.040)
    assert stale.samples_per_s == pytest.approx(100 / 0.029)
    assert stale.efficiency == pytest.approx(100 / 0.029 / 40_000)
    # with a fast server and one worker, the worker's cycle (10 + 8 ms) binds instead
    quick = dataclasses.replace(COSTS, push_bytes=0.0, server_s=0.0)
    assert predict(quick, LINK, "async", 2).samples_per_s == pytest.approx(100 / 0.018)
    assert predict(quick, LINK, "async", 4).samples_per_s == pytest.approx(100 / 0.007)
    assert math.isnan(predict(COSTS, LINK, "async", 1).samples_per_s)  # no worker besides
    with pytest.raises(ValueError, match="mode"):
        predict(COSTS, LINK, "ring", 2)


def test_the_merge_the_collective_link_and_the_loaded_step_by_hand():
    costs = dataclasses.replace(COSTS, merge_s=0.002, loaded_compute_s=0.012, average_s=0.005)
    ring = Link(latency_s=2e-3, bandwidth=1e8)
    # sync, 2 workers: each computes in 12 ms beside the other, then one round of 2 + 10 ms and
    # 2 ms to merge the other's rows; efficiency against one worker alone (10 ms)
    two = predict(costs, LINK, "sync", 2, collective=ring)
    assert two.step_s == pytest.approx(0.012 + 0.002 + 0.012)
    assert two.efficiency == pytest.approx(200 / 0.026 / 20_000)
    # local SGD, 2 workers: 5 ms of the average's own work and 2 messages of 2 MB, every 10 steps
    local = predict(costs, LINK, "local_sgd", 2, collective=ring)
    assert local.step_s == pytest.approx(0.012 + (0.005 + 2 * 0.022) / 10)
    # async takes the point-to-point link, not the collective one
    assert predict(costs, LINK, "async", 2, collective=ring).step_s == pytest.approx(0.042)


def test_fitted_links_reproduce_the_two_worker_steps_they_were_fitted_to():
    costs = dataclasses.replace(COSTS, merge_s=0.0005, average_bytes=2e6, cores=2)
    p2p, ring = Link(1e-4, 1e9), Link(2e-4, 1e9)
    loaded = {"compute": 0.012, "sync": 0.016, "local_sgd": 0.0135, "async": 0.02,
              "average_bytes": 2e6}  # fmt: skip
    fitted, p2p_fit, ring_fit = fitted_links(costs, p2p, ring, loaded)
    # sync: 16 − 12 − 0.5 ms, less 1 MB at 1 GB/s: 2.5 ms a round; async: (20 − 12 − 2 − 2) / 8
    assert ring_fit == Link(pytest.approx(0.0025), 1e9)
    assert p2p_fit == Link(pytest.approx(0.0005), 1e9)
    # an average: 1.5 ms a step over 10 steps, less two messages of 1 MB at the fitted link
    assert fitted.average_s == pytest.approx(0.015 - 2 * 0.0035)
    assert fitted.loaded_compute_s == 0.012
    for mode in ("sync", "local_sgd", "async"):
        step = predict(fitted, p2p_fit, mode, 2, collective=ring_fit).step_s
        assert step == pytest.approx(loaded[mode])
    # a faster loaded step than the idle link allows keeps the idle latency
    quick = fitted_links(costs, p2p, ring, {**loaded, "sync": 0.0125})[2]
    assert quick.latency_s == 2e-4
