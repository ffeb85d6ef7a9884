"""The real-text case: zipfline's default run against fastText's defaults on WordNet's glosses.

Generates the WordNet log once (``generate.source=wordnet``: glosses labeled by lexicographer
file, Zipf traffic, mess and near-duplicates, a held-out test file of glosses the log never
shows), then:

- zipfline: ``zipfline run --set data.raw_path=LOG --set data.test_path=LOG/_test`` with the
  default config (through ``evaluate``; the error decomposition and the registry are off to save
  time, and neither changes the model), plus any ``--set`` given here;
- fastText (``fasttext-numpy2``) with its default settings (dim 100, 5 epochs, lr 0.1, word
  unigrams, one thread per core) on the same distinct training texts and majority labels.

Both are scored on the held-out glosses with the same metric code (distinct-query accuracy,
1 − ``test_error``). The log is cached in ``--work``; delete it to draw it again.

    .venv/bin/python bench/wordnet_case.py [--events 200000] [--queries 12000] [--set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from core.config import load_config
from core.layout import RunContext
from core.spark import get_spark
from pipelines.flow import run_pipeline
from querylog.generator import HELD_OUT_DIR, generate_log
from trainers.evaluate import TestSet, evaluate, read_test_split
from trainers.featurizer import normalize_query
from trainers.serving import Predictor


def accuracy(test_df: pd.DataFrame, labels: list[str], probs: np.ndarray) -> float:
    """Distinct-query accuracy on the test split, as the evaluate stage computes it."""
    return (
        1.0 - evaluate(TestSet.from_frame(test_df, labels), probs, breadth_recall=0.8)["test_error"]
    )


def write_fasttext_file(frame: pd.DataFrame, path: Path) -> Path:
    """``__label__<majority label> <query>`` lines of a split's distinct queries."""
    with path.open("w") as fh:
        for query, label in zip(frame["query"], frame["majority_label"], strict=True):
            fh.write(f"__label__{label} {query}\n")
    return path


def fasttext_predict(model, test_df: pd.DataFrame) -> tuple[list[str], np.ndarray]:  # noqa: ANN001
    """A fastText model's labels and probabilities over them for the test queries."""
    labels = [lab.removeprefix("__label__") for lab in model.get_labels()]
    index = {lab: i for i, lab in enumerate(labels)}
    queries = [normalize_query(q) for q in test_df["query"]]
    got_labels, got_probs = model.predict(queries, k=len(labels))
    probs = np.zeros((len(queries), len(labels)))
    for row, (ls, ps) in enumerate(zip(got_labels, got_probs, strict=True)):
        for lab, p in zip(ls, ps, strict=True):
            probs[row, index[lab.removeprefix("__label__")]] = p
    return labels, probs


def fasttext_default(train_df: pd.DataFrame, test_df: pd.DataFrame, work: Path) -> dict:
    """fastText's supervised defaults on the distinct training texts; accuracy and seconds. Its
    threads race, and now and then a run ends in "Encountered NaN": up to three tries."""
    import fasttext

    path = write_fasttext_file(train_df, work / "fasttext_train.txt")
    for attempt in range(1, 4):
        t0 = time.perf_counter()
        try:
            model = fasttext.train_supervised(str(path), thread=os.cpu_count() or 1, verbose=0)
            break
        except RuntimeError as exc:
            print(f"fastText, try {attempt} of 3: {exc}", flush=True)
            if attempt == 3:
                raise
    seconds = time.perf_counter() - t0
    labels, probs = fasttext_predict(model, test_df)
    return {"accuracy": accuracy(test_df, labels, probs), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=12_000, help="distinct glosses in the log")
    parser.add_argument("--wordnet", default="/usr/share/wordnet", help="WordNet 3 dict folder")
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "zipfline-wordnet"
    )
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a config setting of zipfline's run (repeatable)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"log-{args.events}-{args.queries}"
    base = [f"data.root={work / 'data'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
            "spark.master=local[2]"]  # fmt: skip
    if not log.exists():
        gen = load_config("local", [*base, "generate.source=wordnet", f"generate.wordnet_dir={args.wordnet}",
                                    f"generate.num_events={args.events}",
                                    f"generate.num_queries={args.queries}"])  # fmt: skip
        tmp = log.with_name(log.name + ".tmp")
        result = generate_log(get_spark(gen.spark), gen.generate, tmp)
        tmp.rename(log)
        print(f"generated {result.rows_out:,} events over {result.metrics['num_queries']:,} glosses, "
              f"{result.metrics['held_out_queries']:,} held out", flush=True)  # fmt: skip
    cfg = load_config("local", [*base, f"data.raw_path={log}", f"data.test_path={log / HELD_OUT_DIR}",
                                "eval.decompose=false", "registry.enabled=false", *args.sets])  # fmt: skip
    ctx = RunContext(cfg, "2026-01-01")
    t0 = time.perf_counter()
    summary = run_pipeline(ctx, stop="evaluate", trigger="bench")
    run_seconds = time.perf_counter() - t0
    split_dir = ctx.stage_dir("split")
    train_df = pd.read_parquet(split_dir / "train")
    test_df = read_test_split(split_dir)
    result = json.loads((ctx.stage_dir("train") / "train_result.json").read_text())
    predictor = Predictor.from_file(ctx.stage_dir("train") / "model.pt")
    ours = accuracy(test_df, predictor.labels, predictor.predict_proba(test_df["query"]))
    ft = fasttext_default(train_df, test_df, work)
    row = {
        "events": args.events, "train_queries": len(train_df), "test_queries": len(test_df),
        "labels": len(predictor.labels), "zipfline_accuracy": ours,
        "fasttext_accuracy": ft["accuracy"], "gap_points": 100 * (ours - ft["accuracy"]),
        "stopped_by": result["stopped_by"], "epochs_run": result["epochs_run"],
        "train_seconds": result["time_used_s"], "budget_s": cfg.train.time_budget_s,
        "kernel": result["kernel"], "fasttext_seconds": ft["seconds"], "run_seconds": run_seconds,
        "run_id": summary.run_id, "settings": args.sets,
    }  # fmt: skip
    if args.json:
        print(json.dumps(row))
        return
    print(f"\n{len(train_df):,} distinct training glosses, {len(test_df):,} held-out test glosses, "
          f"{row['labels']} labels")  # fmt: skip
    print(f"zipfline default run: test accuracy {ours:.4f}  (train {result['time_used_s']:.0f}s of "
          f"{cfg.train.time_budget_s:.0f}s, stopped by {result['stopped_by']} after "
          f"{result['epochs_run']} epochs, kernel {result['kernel']})")  # fmt: skip
    print(f"fastText defaults:    test accuracy {ft['accuracy']:.4f}  ({ft['seconds']:.1f}s)")
    print(f"gap: {row['gap_points']:+.2f} points")


if __name__ == "__main__":
    main()
