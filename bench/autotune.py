"""``zipfline run --budget`` against fastText's own autotune at the same wall-clock budget.

For each case (WordNet's glosses with their held-out test file, and the generated log) the data
stages run once; then, for each budget:

- zipfline trains with ``train.auto=true`` and ``train.time_budget_s`` = the budget (what
  ``zipfline run --budget`` sets; its measuring counts against the budget);
- fastText runs ``train_supervised`` with ``autotuneValidationFile`` (the validation split)
  and ``autotuneDuration`` = the budget, on the same distinct training texts.

Both are scored on the same test split (distinct-query accuracy). Prints one row per case and
budget; ``--json`` prints ``{"rows": [...]}``.

    .venv/bin/python bench/autotune.py [--budgets 60,180,600] [--cases wordnet,generated]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
from wordnet_case import accuracy, fasttext_predict, write_fasttext_file

from core.config import load_config
from core.layout import RunContext
from core.spark import get_spark
from jobs.train import AUTO_PLAN_FILE, plan_training
from pipelines.flow import run_pipeline
from querylog.generator import HELD_OUT_DIR, generate_log
from trainers.data import load_manifest
from trainers.evaluate import read_test_split
from trainers.launch import launch_distributor
from trainers.predictor import Predictor
from trainers.spec import TrainSpec


def _case(name: str, work: Path, events: int, queries: int, extra: list[str]) -> RunContext:
    """The case's data stages (cached in ``work``), through shard."""
    base = [f"data.root={work / name / 'data'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
            "spark.master=local[2]", "registry.enabled=false", "eval.decompose=false"]  # fmt: skip
    sets = [*base, f"generate.num_events={events}", f"generate.num_queries={queries}"]
    if name == "wordnet":
        log = work / name / "log"
        if not log.exists():
            gen = load_config("local", [*sets, "generate.source=wordnet"])
            tmp = log.with_name("log.tmp")
            generate_log(get_spark(gen.spark), gen.generate, tmp)
            tmp.rename(log)
        sets += [f"data.raw_path={log}", f"data.test_path={log / HELD_OUT_DIR}"]
    ctx = RunContext(load_config("local", [*sets, *extra]), "2026-01-01")
    run_pipeline(ctx, stop="shard", trigger="bench")
    _ = ctx.spark  # TorchDistributor needs an active session, even when the stages were cached
    return ctx


def zipfline_budget(ctx: RunContext, budget: float, out: Path) -> dict:
    """The train stage's ``--budget`` path: measure, plan, train; test accuracy."""
    shard_dir = ctx.stage_dir("shard")
    t0 = time.perf_counter()
    spec = TrainSpec.from_config(ctx.cfg, shard_dir, out).with_train(
        auto=True, time_budget_s=budget, checkpoint_every=0
    )
    out.mkdir(parents=True, exist_ok=True)
    tuned, _ = plan_training(spec, load_manifest(shard_dir), out)  # what the train stage does
    plan = json.loads((out / AUTO_PLAN_FILE).read_text())
    result = launch_distributor(tuned)
    seconds = time.perf_counter() - t0
    test_df = read_test_split(ctx.stage_dir("split"))
    predictor = Predictor.from_file(out / "model.pt")
    acc = accuracy(test_df, predictor.labels, predictor.predict_proba(test_df["query"]))
    choices = {c["setting"]: c["value"] for c in plan["choices"]}
    return {"accuracy": acc, "seconds": seconds, "stopped_by": result["stopped_by"],
            "epochs_run": result["epochs_run"], "plan": choices}  # fmt: skip


def fasttext_autotune(ctx: RunContext, budget: float, work: Path) -> dict:
    """fastText's autotune on the validation split for ``budget`` seconds; test accuracy."""
    import fasttext

    split = ctx.stage_dir("split")
    train = write_fasttext_file(pd.read_parquet(split / "train"), work / "ft_train.txt")
    valid = write_fasttext_file(pd.read_parquet(split / "validation"), work / "ft_valid.txt")
    t0 = time.perf_counter()
    model = fasttext.train_supervised(str(train), autotuneValidationFile=str(valid),
                                      autotuneDuration=int(budget), verbose=0)  # fmt: skip
    seconds = time.perf_counter() - t0
    test_df = read_test_split(split)
    labels, probs = fasttext_predict(model, test_df)
    args = model.f.getArgs()
    return {"accuracy": accuracy(test_df, labels, probs), "seconds": seconds,
            "plan": {"dim": args.dim, "epoch": args.epoch, "lr": round(args.lr, 4),
                     "wordNgrams": args.wordNgrams, "bucket": args.bucket}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="60,180,600", help="seconds, comma-separated")
    parser.add_argument("--cases", default="wordnet,generated")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=12_000)
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "zipfline-autotune"
    )
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a config setting of zipfline's side (repeatable)")  # fmt: skip
    parser.add_argument("--no-fasttext", action="store_true", help="zipfline's side only")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.cases.split(","):
        ctx = _case(name, work, args.events, args.queries, args.sets)
        for budget in (float(b) for b in args.budgets.split(",")):
            ours = zipfline_budget(ctx, budget, work / name / f"zipfline-{budget:.0f}")
            ft = {"accuracy": float("nan"), "seconds": 0.0, "plan": {}}
            if not args.no_fasttext:
                ft = fasttext_autotune(ctx, budget, work / name)
            rows.append({"case": name, "budget_s": budget, "zipfline": ours, "fasttext": ft,
                         "gap_points": 100 * (ours["accuracy"] - ft["accuracy"])})  # fmt: skip
            if not args.json:
                print(f"{name:<10}{budget:>6.0f}s  zipfline {ours['accuracy']:.4f} ({ours['seconds']:.0f}s, "
                      f"{ours['stopped_by']}, {ours['plan']})  fastText autotune {ft['accuracy']:.4f} "
                      f"({ft['seconds']:.0f}s, {ft['plan']})  gap {rows[-1]['gap_points']:+.2f}",
                      flush=True)  # fmt: skip
    if args.json:
        print(json.dumps({"rows": rows}, default=lambda o: dataclasses.asdict(o)))


if __name__ == "__main__":
    main()
