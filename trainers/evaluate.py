"""Evaluation on the test split: distinct and traffic-weighted errors, log-loss, breadth and
accuracy by Zipf bucket (docs/architecture.md, "Definitions"), plus the Bayes error when the
generator's truth is known.

A distinct test query stands for all its labeled events: with label counts c_k over n events,
predicting k is right on c_k / n of them. ``test_error`` averages that over distinct queries;
``test_error_weighted`` weighs each query by its traffic (``weight``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

EPS = 1e-12
BUCKETS = ("head", "torso", "tail")


@dataclass(frozen=True)
class TestSet:
    """Test queries as a dense label-count matrix over ``labels``."""

    __test__ = False  # not a pytest test class, whatever its name

    queries: list[str]
    labels: list[str]
    counts: np.ndarray  # [n, K] labeled events per label
    weights: np.ndarray  # [n] traffic weight
    buckets: np.ndarray  # [n] head / torso / tail

    @classmethod
    def from_frame(cls, df: pd.DataFrame, model_labels: list[str]) -> TestSet:
        """From a test split frame (``label_counts`` as a map), over the model's labels first
        and then any label only the test set has (which the model can never predict)."""
        pairs = [dict(lc) if not isinstance(lc, dict) else lc for lc in df["label_counts"]]
        extra = sorted({k for p in pairs for k in p} - set(model_labels))
        labels = list(model_labels) + extra
        index = {k: i for i, k in enumerate(labels)}
        counts = np.zeros((len(pairs), len(labels)))
        for row, p in enumerate(pairs):
            for k, v in p.items():
                counts[row, index[k]] += float(v)
        return cls(
            queries=list(df["query"]),
            labels=labels,
            counts=counts,
            weights=df["weight"].to_numpy(dtype=np.float64),
            buckets=df["bucket"].to_numpy(dtype=object),
        )


def expected_errors(counts: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Per query: the share of its labeled events that disagree with the predicted label."""
    totals = np.maximum(counts.sum(axis=1), EPS)
    return 1.0 - counts[np.arange(len(predicted)), predicted] / totals


def bootstrap_intervals(
    values: dict[str, np.ndarray], weights: np.ndarray, rounds: int, seed: int
) -> dict[str, float]:
    """95% percentile intervals of per-query means (``<name>_ci_low``/``_ci_high``) by
    resampling the distinct test queries; names ending in ``_weighted`` are traffic-weighted."""
    n = len(weights)
    if rounds <= 0 or n < 2:
        return {}
    idx = np.random.default_rng(seed).integers(0, n, size=(rounds, n))
    out = {}
    for name, per_query in values.items():
        if name.endswith("_weighted"):
            w = weights[idx]
            means = (w * per_query[idx]).sum(axis=1) / np.maximum(w.sum(axis=1), EPS)
        else:
            means = per_query[idx].mean(axis=1)
        lo, hi = np.percentile(means, [2.5, 97.5])
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = float(lo), float(hi)
    return out


def confusions(test: TestSet, predicted: np.ndarray, top: int = 5) -> list[dict[str, object]]:
    """The label pairs the model confuses most: labeled events of ``true`` predicted as
    ``predicted``, largest first."""
    k = len(test.labels)
    mass = np.zeros((k, k))
    for j in range(k):
        rows = predicted == j
        if rows.any():
            mass[:, j] += test.counts[rows].sum(axis=0)
    np.fill_diagonal(mass, 0)
    order = np.argsort(mass, axis=None)[::-1][:top]
    pairs = []
    for flat in order:
        t, p = divmod(int(flat), k)
        if mass[t, p] <= 0:
            break
        pairs.append({"true": test.labels[t], "predicted": test.labels[p], "events": float(mass[t, p]),
                      "share": float(mass[t, p] / max(test.counts.sum(), EPS))})  # fmt: skip
    return pairs


def evaluate(
    test: TestSet,
    probs: np.ndarray,
    *,
    breadth_recall: float,
    prior_label: int | None = None,
    truth_labels: Iterable[str | None] | None = None,
    bootstrap_rounds: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """The evaluation metrics from model probabilities over the first ``probs.shape[1]`` labels.

    ``prior_label``: index of the majority training label, for the ``baseline_error``.
    ``truth_labels``: the Bayes-optimal label of each test query, when known, for ``bayes_error``.
    ``bootstrap_rounds``: resamples of the test queries for the 95% intervals (0: none).
    """
    n, k_model = probs.shape
    if n == 0:
        raise ValueError("empty test set")
    full = np.zeros((n, len(test.labels)))
    full[:, :k_model] = probs
    predicted = full.argmax(axis=1)
    err = expected_errors(test.counts, predicted)
    w = test.weights
    totals = np.maximum(test.counts.sum(axis=1), EPS)
    logloss = -(test.counts * np.log(np.clip(full, EPS, 1.0))).sum(axis=1) / totals
    metrics: dict[str, float] = {
        "test_error": float(err.mean()),
        "test_error_weighted": float((w * err).sum() / max(w.sum(), EPS)),
        "test_logloss": float(logloss.mean()),
        "n_test": float(n),
    }
    metrics |= bootstrap_intervals(
        {"test_error": err, "test_error_weighted": err, "test_logloss": logloss},
        w, bootstrap_rounds, seed,
    )  # fmt: skip
    mass = test.counts.sum(axis=0)
    hit = np.zeros(len(test.labels))
    np.add.at(hit, predicted, test.counts[np.arange(n), predicted])
    present = mass > 0
    recall = hit[present] / mass[present]
    metrics["breadth"] = float((recall >= breadth_recall).mean())
    for bucket in BUCKETS:
        mask = test.buckets == bucket
        metrics[f"acc_{bucket}"] = float(1.0 - err[mask].mean()) if mask.any() else float("nan")
        metrics[f"n_test_{bucket}"] = float(mask.sum())
    if prior_label is not None:
        metrics["baseline_error"] = float(
            expected_errors(test.counts, np.full(n, prior_label)).mean()
        )
    if truth_labels is not None:
        index = {k: i for i, k in enumerate(test.labels)}
        truth = list(truth_labels)
        if all(t is not None and t in index for t in truth):
            bayes_pred = np.array([index[t] for t in truth])
            metrics["bayes_error"] = float(expected_errors(test.counts, bayes_pred).mean())
    return metrics


def read_test_split(split_dir: Path) -> pd.DataFrame:
    """The test split as pandas (a folder of Parquet parts)."""
    return pd.read_parquet(split_dir / "test")
