"""evaluate: the trained pyfunc model on the test split, from raw query text.

Metrics of DESIGN §7/§8 (``test_error``, ``test_error_weighted``, ``test_logloss``,
``breadth``, ``acc_head``/``acc_torso``/``acc_tail``, ``baseline_error`` of the majority
training label, and ``bayes_error`` when the generator's truth covers the test set, with
bootstrap 95% intervals ``<error>_ci_low``/``_ci_high``) go to ``metrics.json``; the most
confused label pairs to ``confusions.json`` (and the tag ``top_confusions``); per-query
predictions to ``predictions.parquet``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if not __package__:  # started as a script by spark-submit: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlflow.pyfunc
import numpy as np
import pandas as pd
from pyspark.sql import functions as F

from jobs.generate import TRUTH_DIR
from pipelines.errors import DataError
from pipelines.stage import RunContext, StageResult
from trainers.evaluate import TestSet, confusions, evaluate, read_test_split
from trainers.serving import quiet_pyfunc

STAGE = "evaluate"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.parquet"
CONFUSIONS_FILE = "confusions.json"


def truth_path(ctx: RunContext) -> Path | None:
    """The generator's truth for this run's data, when the data came from ``generate``."""
    raw = ctx.cfg.data.raw_path
    base = ctx.stage_dir("generate") if not raw else Path(raw)
    path = base / TRUTH_DIR / "queries.parquet"
    return path if path.exists() else None


def majority_training_label(ctx: RunContext) -> str | None:
    """The most common majority label among distinct training queries: the majority-class
    baseline on the same footing as ``test_error`` (each distinct query once)."""
    train = ctx.spark.read.parquet(str(ctx.require("split") / "train"))
    row = train.groupBy("majority_label").count().orderBy(F.desc("count"), "majority_label").first()
    return row["majority_label"] if row else None


def weighted_error(ctx: RunContext, model_uri: str) -> float:
    """``test_error_weighted`` of any pyfunc model (e.g. the registry's champion) on this run's
    test split, computed exactly as the evaluate stage computes it."""
    test_df = read_test_split(ctx.require("split"))
    with quiet_pyfunc():
        model = mlflow.pyfunc.load_model(model_uri)
    predicted = model.predict(test_df[["query"]])
    labels = model.unwrap_python_model().predictor.labels
    probs = np.vstack(predicted["probabilities"].to_numpy())
    test = TestSet.from_frame(test_df, labels)
    return evaluate(test, probs, breadth_recall=ctx.cfg.eval.breadth_recall)["test_error_weighted"]


def run(ctx: RunContext, out: Path) -> StageResult:
    from jobs.train import PYFUNC_DIR

    test_df = read_test_split(ctx.require("split"))
    if test_df.empty:
        raise DataError(f"stage {STAGE}: the test split under {ctx.stage_dir('split')} is empty")
    with quiet_pyfunc():
        model = mlflow.pyfunc.load_model(str(ctx.require("train") / PYFUNC_DIR))
    predicted = model.predict(test_df[["query"]])
    labels = model.unwrap_python_model().predictor.labels
    test = TestSet.from_frame(test_df, labels)
    prior = majority_training_label(ctx)
    truth_labels = None
    tags = {"bayes_known": "false"}
    truth = truth_path(ctx)
    if truth is not None:
        majority = pd.read_parquet(truth, columns=["query", "majority_label"])
        lookup = dict(zip(majority["query"], majority["majority_label"], strict=True))
        truth_labels = [lookup.get(q) for q in test.queries]
    metrics = evaluate(
        test,
        np.vstack(predicted["probabilities"].to_numpy()),
        breadth_recall=ctx.cfg.eval.breadth_recall,
        prior_label=labels.index(prior) if prior in labels else None,
        truth_labels=truth_labels,
        bootstrap_rounds=ctx.cfg.eval.bootstrap_rounds,
        seed=ctx.cfg.eval.seed,
    )
    predicted_ids = np.array([labels.index(x) for x in predicted["label"]])
    confused = confusions(test, predicted_ids, ctx.cfg.eval.top_confusions)
    (out / CONFUSIONS_FILE).write_text(json.dumps(confused, indent=2))
    if confused:
        tags["top_confusions"] = "; ".join(
            f"{c['true']}→{c['predicted']} {c['share']:.2%}" for c in confused
        )
    if "bayes_error" in metrics:
        tags["bayes_known"] = "true"
    for bucket in ("head", "torso", "tail"):  # a metric that cannot be computed says why
        if metrics.get(f"n_test_{bucket}") == 0:
            tags[f"missing.acc_{bucket}"] = f"no {bucket} queries in the test split"
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    pd.DataFrame(
        {
            "query": test_df["query"],
            "bucket": test_df["bucket"],
            "weight": test_df["weight"],
            "predicted": predicted["label"],
            "confidence": predicted["confidence"],
        }
    ).to_parquet(out / PREDICTIONS_FILE, index=False)
    return StageResult(
        rows_in=len(test_df),
        rows_out=len(test_df),
        metrics=metrics,
        params={"breadth_recall": ctx.cfg.eval.breadth_recall},
        tags=tags,
        artifacts=[METRICS_FILE, CONFUSIONS_FILE],
    )


def main(argv: list[str] | None = None) -> int:
    """``spark-submit jobs/evaluate.py --env E --set k=v``."""
    from pipelines.cli import stage_main

    return stage_main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
