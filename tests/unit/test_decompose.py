"""The error decomposition: the curve fit, the sum identity, and what is reported missing."""

from __future__ import annotations

import numpy as np
import pytest

from trainers.decompose import decompose, decomposition, fit_learning_curve


def test_learning_curve_fit_recovers_its_asymptote():
    m = np.array([1000, 2000, 4000, 8000, 16000], dtype=float)
    risk = 0.12 + 3.0 * m**-0.5
    a, b, c = fit_learning_curve(m, risk)
    assert a == pytest.approx(0.12, abs=2e-3) and c == pytest.approx(0.5, abs=0.05)
    assert fit_learning_curve(m[:2], risk[:2]) is None  # three parameters need three points
    assert fit_learning_curve(m, 0.1 + m * 1e-6) is None  # risk growing with data: no fit


@pytest.mark.parametrize("seed", range(5))
def test_terms_add_up_to_the_excess_error_exactly(seed):
    rng = np.random.default_rng(seed)
    run, bayes, converged, asymptote = rng.uniform(0, 0.5, size=4)
    terms = decompose(run, bayes, converged, asymptote)
    assert sum(terms.values()) == pytest.approx(run - bayes, abs=1e-12)


def _refs(errors, stopped="converged"):
    return [
        {"fraction": f, "test_error": e, "test_logloss": 3 * e, "stopped_by": stopped}
        for f, e in zip((0.125, 0.25, 0.5, 1.0), errors, strict=True)
    ]


def test_decomposition_with_and_without_the_truth():
    errors = [0.3, 0.22, 0.18, 0.16]
    run = {"test_error": 0.17, "test_logloss": 0.6, "bayes_error": 0.05, "bayes_logloss": 0.2}
    metrics, missing = decomposition(run, _refs(errors), n_train=8000)
    assert not missing
    total = metrics["err_approx"] + metrics["err_estim"] + metrics["err_optim"]
    assert total == pytest.approx(0.17 - 0.05, abs=1e-12)
    assert metrics["err_optim"] == pytest.approx(0.01)  # the run against the converged one
    assert metrics["err_estim"] > 0 and metrics["err_approx"] > 0
    total_ll = sum(metrics[f"err_{t}_logloss"] for t in ("approx", "estim", "optim"))
    assert total_ll == pytest.approx(0.6 - 0.2, abs=1e-12)
    # without truth the best reference stands in for the Bayes risk (bayes_known=false)
    metrics, _ = decomposition({"test_error": 0.17, "test_logloss": 0.6}, _refs(errors), 8000)
    assert metrics["bayes_error"] <= 0.16


def test_what_cannot_be_computed_is_missing_with_a_reason():
    run = {"test_error": 0.17, "test_logloss": 0.6, "bayes_error": 0.05, "bayes_logloss": 0.2}
    metrics, missing = decomposition(run, _refs([0.2, 0.2, 0.2, 0.2], "budget"), 8000)
    assert metrics == {} and "did not converge" in missing["missing.err_optim"]
    metrics, missing = decomposition(run, _refs([0.1, 0.12, 0.15, 0.2]), 8000)
    assert "no decreasing learning curve" in missing["missing.err_approx"]
    assert "err_approx" not in metrics and metrics["err_optim"] == pytest.approx(-0.03)
