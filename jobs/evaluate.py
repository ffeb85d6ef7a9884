"""evaluate: the trained pyfunc model on the test split, from raw query text.

Metrics (docs/architecture.md, "MLflow record" and "Definitions": ``test_error``,
``test_error_weighted``, ``test_logloss``, ``breadth``, ``acc_head``/``acc_torso``/``acc_tail``,
``baseline_error`` of the majority training label, and ``bayes_error`` when the generator's truth
covers the test set, with bootstrap 95% intervals ``<error>_ci_low``/``_ci_high``) go to
``metrics.json``; the most confused label pairs to ``confusions.json`` (and the tag
``top_confusions``); per-query predictions to ``predictions.parquet``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

if not __package__:  # started as a script by spark-submit: the project, not jobs/, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # (jobs/select.py would hide `select`)

import mlflow.pyfunc
import numpy as np
import pandas as pd

from core.errors import DataError
from core.layout import PYFUNC_DIR, TRAIN_SPEC_FILE, RunContext, StageResult
from querylog.generator import label_names, truth_path
from trainers.data import load_manifest
from trainers.evaluate import TestSet, confusions, evaluate, read_test_split
from trainers.plots import bucket_accuracy, decomposition_bar, learning_curve
from trainers.serving import quiet_pyfunc
from trainers.spec import TrainSpec

STAGE = "evaluate"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.parquet"
CONFUSIONS_FILE = "confusions.json"
PLOTS_DIR = "plots"


def majority_training_label(ctx: RunContext) -> str | None:
    """The most common majority label among distinct training queries: the majority-class
    baseline on the same footing as ``test_error`` (each distinct query once)."""
    train = ctx.spark.read.parquet(str(ctx.require("split") / "train"))
    # the labels are few: their counts come back and the driver picks the largest (ties to the
    # first name)
    counts = train.groupBy("majority_label").count().collect()
    best = min(counts, key=lambda r: (-r["count"], r["majority_label"]), default=None)
    return best["majority_label"] if best else None


def bayes_logloss(test: TestSet, truth: pd.DataFrame) -> float | None:
    """The Bayes predictor's log-loss on the test events: the truth's label distribution of each
    query as its prediction (None when the truth does not cover every test query)."""
    by_query = dict(zip(truth["query"], truth["label_probs"], strict=True))
    if not all(q in by_query for q in test.queries):
        return None
    names = label_names(len(next(iter(by_query.values()))))
    probs = np.zeros((len(test.queries), len(test.labels)))
    for j, label in enumerate(test.labels):
        if label in names:
            k = names.index(label)
            probs[:, j] = [by_query[q][k] for q in test.queries]
    totals = np.maximum(test.counts.sum(axis=1), 1e-12)
    per_query = -(test.counts * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1) / totals
    return float(per_query.mean())


def error_decomposition(
    ctx: RunContext, test_df: pd.DataFrame, metrics: dict[str, float]
) -> tuple[dict[str, float], dict[str, str], list[dict]]:
    """Reference runs (cached under ``<data.root>/_reference_cache``) and the decomposition:
    the train stage's spec, each run one process trained towards convergence."""
    # Dask and the reference runs: only when the decomposition is on (evaluate starts faster)
    from trainers.decompose import FRACTIONS, cache_key, decomposition, run_references

    cfg = ctx.cfg.eval
    trained = TrainSpec.read(ctx.require("train") / TRAIN_SPEC_FILE)
    manifest = load_manifest(Path(trained.shard_dir))
    # patience 1: a reference run ends at its first evaluation short of eval.reference_tolerance.
    # The torch loop's mini-batches: under that rule the per-example kernel's noisier validation
    # loss stops it early, and its learning curves put a tiny model's err_approx below a big
    # one's (test_decomposition)
    spec = trained.with_train(
        time_budget_s=cfg.reference_budget_s, epochs=cfg.reference_epochs,
        tolerance=cfg.reference_tolerance, patience=1, world_size=1, mode="sync", kernel="torch",
    )  # fmt: skip
    key = cache_key(manifest, spec, {"fractions": FRACTIONS, "test": _test_fingerprint(test_df)})
    cache = Path(ctx.cfg.data.root).expanduser().resolve() / "_reference_cache" / f"{key}.json"
    n_train = int(manifest["splits"]["train"]["rows"])
    if cache.exists():
        references = json.loads(cache.read_text())
        print(f"[evaluate] reference runs from cache {cache.name}", file=sys.stderr, flush=True)
    else:
        in_process = not cfg.dask_scheduler and n_train < cfg.local_cluster_min_rows
        where = (
            f"in this process ({n_train:,} training rows, under eval.local_cluster_min_rows)"
            if in_process
            else f"on Dask ({cfg.dask_scheduler or f'LocalCluster, {cfg.dask_workers} workers'})"
        )
        print(f"[evaluate] {len(FRACTIONS)} reference runs {where} …", file=sys.stderr, flush=True)
        references = run_references(
            spec, test_df, scheduler=cfg.dask_scheduler or None, workers=cfg.dask_workers,
            in_process=in_process,
        )  # fmt: skip
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(references, indent=2))
    return (*decomposition(metrics, references, n_train), references)


def _test_fingerprint(test_df: pd.DataFrame) -> str:
    text = pd.util.hash_pandas_object(test_df[["query", "weight"]], index=False).to_numpy()
    return hashlib.sha256(text.tobytes()).hexdigest()[:16]


def predict_test(model_uri: str, test_df: pd.DataFrame) -> tuple[pd.DataFrame, list[str], TestSet]:
    """A pyfunc model's predictions on the test split from raw text, its labels, and the test
    set over them."""
    with quiet_pyfunc():
        model = mlflow.pyfunc.load_model(model_uri)
    predicted = model.predict(test_df[["query"]])
    labels = model.unwrap_python_model().predictor.labels
    return predicted, labels, TestSet.from_frame(test_df, labels)


def weighted_error(ctx: RunContext, model_uri: str) -> float:
    """``test_error_weighted`` of any pyfunc model (e.g. the registry's champion) on this run's
    test split, computed exactly as the evaluate stage computes it."""
    predicted, _, test = predict_test(model_uri, read_test_split(ctx.require("split")))
    probs = np.vstack(predicted["probabilities"].to_numpy())
    return evaluate(test, probs, breadth_recall=ctx.cfg.eval.breadth_recall)["test_error_weighted"]


def run(ctx: RunContext, out: Path) -> StageResult:
    test_df = read_test_split(ctx.require("split"))
    if test_df.empty:
        raise DataError(f"stage {STAGE}: the test split under {ctx.stage_dir('split')} is empty")
    predicted, labels, test = predict_test(str(ctx.require("train") / PYFUNC_DIR), test_df)
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
    if truth is not None:
        bayes_ll = bayes_logloss(test, pd.read_parquet(truth, columns=["query", "label_probs"]))
        if bayes_ll is not None:
            metrics["bayes_logloss"] = bayes_ll
    if "bayes_error" in metrics:
        tags["bayes_known"] = "true"
    references: list[dict] = []
    if ctx.cfg.eval.decompose:
        more, missing, references = error_decomposition(ctx, test_df, metrics)
        metrics |= more
        tags |= missing
    plots = out / PLOTS_DIR
    plots.mkdir()
    bucket_accuracy(metrics, plots / "accuracy_by_bucket.png")
    if references:
        n_train = int(load_manifest(ctx.require("shard"))["splits"]["train"]["rows"])
        learning_curve(references, n_train, metrics, plots / "learning_curve.png")
    if "err_optim" in metrics:
        decomposition_bar(metrics, plots / "error_decomposition.png")
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
        artifacts=[METRICS_FILE, CONFUSIONS_FILE, PLOTS_DIR],
    )


if __name__ == "__main__":  # spark-submit jobs/<stage>.py: the CLI's one entry for a stage alone
    from pipelines.cli import stage_main

    sys.exit(stage_main(STAGE))
