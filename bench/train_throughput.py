"""Training throughput and accuracy against fastText on the generator's data.

Generates a log (default 1M events over 200k distinct queries), runs the data stages to shards
(distinct queries weighted equally, ``shard.sampling=unique``, so both learners see the same
examples), then trains for a fixed number of epochs with no early stop:

- zipfline's numba kernel (fastText's per-example update, row-wise Adagrad; and plain SGD) with
  1, 2, 4, 8 worker processes (as many as the machine has cores, one thread each) sharing one
  copy of the weights (``train.mode=shared``), and 2 averaging replicas (``local_sgd``); its torch
  loop (sync with the row exchange at fp32 and bf16, and with the gradients on the wire in fp16
  and bf16, ``train.exchange_precision``; local SGD; async, a parameter server and 1 or 2
  workers), through TorchDistributor local mode:
  samples/s, per core, scaling efficiency against one worker, and bytes each worker sends per
  step;
- fastText (``fasttext-numpy2``) on the same distinct training texts, one thread and all cores,
  with the same dimension, word n-grams, buckets and epochs: examples/s.

Both models are scored on the same test split with the same metric code (distinct-query
accuracy, 1 − ``test_error``). Prints a table.

    .venv/bin/pip install fasttext-numpy2
    .venv/bin/python bench/train_throughput.py [--events 1000000] [--epochs 5] [--work DIR]
        [--only "torch sync" ...] [--no-fasttext]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from wordnet_case import accuracy, fasttext_predict, write_fasttext_file

from core.config import load_config
from core.layout import RunContext
from pipelines.flow import run_pipeline
from trainers.evaluate import read_test_split
from trainers.launch import launch_distributor
from trainers.serving import Predictor
from trainers.spec import TrainSpec

ASYNC_LR = 20.0
"""Async mode's rate: SGD on the batch-mean gradient, so about fastText's per-example rate (0.1
to 0.5) times the batch size (256) divided by a few."""


def run_zipfline(cfg, shard_dir: Path, out: Path, workers: int, **train) -> dict:
    """``train.epochs`` epochs, no early stop, no checkpoints, TorchDistributor local mode."""
    spec = TrainSpec.from_config(cfg, shard_dir, out).with_train(
        world_size=workers, time_budget_s=1e9, checkpoint_every=0, local_mode=True,
        use_gpu=False, **train,
    )  # fmt: skip
    return launch_distributor(dataclasses.replace(spec, early_stop=False))


def run_fasttext(
    train_df: pd.DataFrame, test_df: pd.DataFrame, cfg, epochs: int, work: Path, threads: int = 1
) -> dict:
    import fasttext

    path = write_fasttext_file(train_df, work / "fasttext_train.txt")
    t0 = time.perf_counter()
    model = fasttext.train_supervised(
        str(path), dim=cfg.model.dim, wordNgrams=cfg.featurizer.word_ngrams,
        bucket=cfg.featurizer.num_buckets, epoch=epochs, thread=threads, minCount=1, lr=0.5, verbose=0,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    labels, probs = fasttext_predict(model, test_df)
    return {
        "samples_per_s": len(train_df) * epochs / seconds,
        "seconds": seconds,
        "accuracy": accuracy(test_df, labels, probs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "zipfline-bench")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="only zipfline's learners whose name has TEXT (repeatable)",
    )
    parser.add_argument("--no-fasttext", action="store_true", help="zipfline's rows only")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(
        "local",
        [
            f"data.root={args.work / 'data'}", f"tracking.uri=sqlite:///{args.work / 'mlflow.db'}",
            f"generate.num_events={args.events}", f"generate.num_queries={args.queries}",
            "shard.sampling=unique", f"train.epochs={args.epochs}", "spark.master=local[2]",
        ],
    )  # fmt: skip
    ctx = RunContext(cfg, "2026-01-01")
    t0 = time.perf_counter()
    run_pipeline(ctx, stop="shard", trigger="bench")
    _ = ctx.spark  # TorchDistributor needs an active session, even when the stages were cached
    print(f"data stages (or their cached output): {time.perf_counter() - t0:.0f}s")
    split_dir, shard_dir = ctx.stage_dir("split"), ctx.stage_dir("shard")
    train_df = pd.read_parquet(split_dir / "train")
    test_df = read_test_split(split_dir)
    print(f"{len(train_df):,} distinct training queries, {len(test_df):,} test queries, "
          f"{args.epochs} epochs, dim {cfg.model.dim}, word n-grams {cfg.featurizer.word_ngrams}, "
          f"{cfg.featurizer.num_buckets:,} buckets, {os.cpu_count()} cores")  # fmt: skip

    cores = os.cpu_count() or 1
    counts = [w for w in (1, 2, 4, 8) if w <= cores]
    # name, precision, workers, train.* settings; scaling is against the one-worker row of the
    # same family (none run: nan)
    learners = [
        *[("numba rowwise_adagrad shared", "fp32", w, {"kernel": "numba", "mode": "shared"})
          for w in counts],
        *[("numba rowwise_adagrad local_sgd", "fp32", w, {"kernel": "numba", "mode": "local_sgd"})
          for w in counts[1:2]],
        ("numba rowwise_adagrad lr 0.1", "fp32", 1, {"kernel": "numba", "lr": 0.1}),
        ("numba sgd", "fp32", 1, {"kernel": "numba", "optimizer": "sgd", "lr": 0.5}),
        *[("torch sync", "fp32", w, {"kernel": "torch", "mode": "sync"}) for w in counts[:2]],
        *[(f"torch sync exchange {wire}", "fp32", w,
           {"kernel": "torch", "mode": "sync", "exchange_precision": wire})
          for wire in ("fp16", "bf16") for w in counts[1:2]],
        ("torch sync", "bf16", 1, {"kernel": "torch", "mode": "sync", "precision": "bf16"}),
        *[("torch local_sgd", "fp32", w, {"kernel": "torch", "mode": "local_sgd"})
          for w in counts[:2]],
        # a parameter server and 1 or 2 workers (plain SGD on the server: a larger rate)
        *[("torch async", "fp32", w, {"kernel": "torch", "mode": "async", "lr": ASYNC_LR})
          for w in (2, 3)],
    ]  # fmt: skip
    if args.only:
        learners = [row for row in learners if any(part in row[0] for part in args.only)]
    rows, single = [], {}
    for name, precision, workers, train in learners:
        out = args.work / f"run-{name.replace(' ', '-')}-{precision}-{workers}"
        result = run_zipfline(cfg, shard_dir, out, workers, **{"precision": precision, **train})
        predictor = Predictor.from_file(out / "model.pt")
        acc = accuracy(test_df, predictor.labels, predictor.predict_proba(test_df["query"]))
        sps = result["samples_per_s"]
        # numba rows scale against the kernel's first row, the exchange's variants against sync
        stem = name.split(" exchange")[0]
        family = (" ".join(name.split()[:2]) if name.startswith("numba") else stem, precision)
        if workers == 1:
            single.setdefault(family, sps)
        eff = sps / (workers * single[family]) if family in single else float("nan")
        rows.append((f"zipfline {name}", "cpu", precision, workers, sps, sps / workers, eff,
                     result.get("bytes_per_step"), acc))  # fmt: skip
        print(f"  {rows[-1][0]} {precision} x{workers}: {sps:,.0f} samples/s, acc {acc:.4f}",
              flush=True)  # fmt: skip
    fasttext_rows = []
    for threads in [] if args.no_fasttext else sorted({1, cores}):
        ft = run_fasttext(train_df, test_df, cfg, args.epochs, args.work, threads)
        fasttext_rows.append(ft)
        rows.append(("fastText", "cpu", "fp32", threads, ft["samples_per_s"],
                     ft["samples_per_s"] / threads, ft["samples_per_s"] / (threads * (
                         fasttext_rows[0]["samples_per_s"])), None, ft["accuracy"]))  # fmt: skip

    print(f"\n{'learner':<44}{'device':>7}{'prec':>6}{'workers':>8}{'samples/s':>12}"
          f"{'per core':>11}{'scaling':>9}{'bytes/step':>12}{'test acc':>10}")  # fmt: skip
    for name, device, precision, workers, sps, per_core, eff, sent, acc in rows:
        sent_s = "-" if sent is None or np.isnan(sent) else f"{sent:,.0f}"
        print(f"{name:<44}{device:>7}{precision:>6}{workers:>8}{sps:>12,.0f}{per_core:>11,.0f}"
              f"{eff:>9.2f}{sent_s:>12}{acc:>10.4f}")  # fmt: skip
    one = [r for r in rows if r[0] == "zipfline numba rowwise_adagrad shared" and r[3] == 1]
    if not fasttext_rows or not one:
        return
    ft1, one = fasttext_rows[0], one[0]
    print(f"\nnumba kernel, 1 worker / fastText, 1 thread: samples/s {one[4] / ft1['samples_per_s']:.2f}x,"
          f" test accuracy {one[8] - ft1['accuracy']:+.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
