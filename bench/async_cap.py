"""Async mode's staleness-aware rate cap on the generated log: where plain SGD one version late
diverges, the cap keeps it converging.

Generates a log and runs the data stages to shards (as ``bench/train_throughput.py`` does),
measures λ_max of the embedding block as ``--budget`` does (power iteration on Hessian-vector
products, ``trainers.autoplan``), then trains at rates η₀ = k/λ_max:

async mode with 1, 2 and 3 workers (a parameter server besides), without the cap and with it
(``train.lambda_max``; η₀·λ_max is then at most ``auto_lr_safety`` of the lowest
max(t, 1)·2·sin(π/(4t+2)) for t up to the pushes' 95th-percentile staleness: 2 where every push
is fresh, else 1). One worker is plain SGD with fresh gradients (τ = 0,
step for step: the sync case, stable on a quadratic while η₀·λ_max < 2); beyond it τ ≥ 1, and a
full step one version late is stable only while η₀·λ_max < 1. λ_max is the whole model's, since
the server steps every parameter at ``train.lr``.

For each run it prints the validation loss after every epoch, the staleness seen, the cap, and
what became of it: ``diverged`` (a validation loss that is not finite, or ends above that of
guessing every class alike, ln(classes)), ``stalled`` (within 0.1 of it) or ``learns``.

    .venv/bin/python bench/async_cap.py [--events 100000] [--epochs 3] [--k 1.8 --k 6]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from pathlib import Path

from core.config import load_config
from core.layout import RunContext
from pipelines.flow import run_pipeline
from trainers.autoplan import configure
from trainers.data import load_manifest
from trainers.launch import launch_processes
from trainers.spec import TrainSpec


def outcome(history: list[dict], classes: int) -> str:
    """``diverged`` (a validation loss that is not finite, or a last one above ln(classes), the
    loss of guessing every class alike), ``stalled`` (within 0.1 of it) or ``learns``."""
    losses = [h["val_loss"] for h in history]
    guess = math.log(classes)
    if not losses or not all(map(math.isfinite, losses)) or losses[-1] > guess + 0.1:
        return "diverged"
    return "stalled" if losses[-1] > guess - 0.1 else "learns"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--k", type=float, action="append", help="η₀·λ_max to try (repeatable)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "zipfline-cap")
    args = parser.parse_args()
    ks = args.k or [1.8, 6.0]
    cfg = load_config(
        "local",
        [
            f"data.root={args.work / 'data'}", f"tracking.uri=sqlite:///{args.work / 'mlflow.db'}",
            f"generate.num_events={args.events}", f"generate.num_queries={args.queries}",
            "shard.sampling=unique", "spark.master=local[2]", "dq.enabled=false",
            "dedupe.near_enabled=false",
        ],
    )  # fmt: skip
    ctx = RunContext(cfg, "2026-01-01")
    run_pipeline(ctx, stop="shard", trigger="bench")
    shard_dir = ctx.stage_dir("shard")
    base = TrainSpec.from_config(cfg, shard_dir, args.work / "runs").with_train(
        kernel="torch", optimizer="sgd", epochs=args.epochs, time_budget_s=1e9,
        checkpoint_every=0, lr_schedule="constant",
    )  # fmt: skip
    t0 = time.perf_counter()
    _, report = configure(base.with_train(auto=True, mode="async", world_size=3),
                          load_manifest(shard_dir))  # fmt: skip
    classes = len(load_manifest(shard_dir)["labels"])
    lam = next(c["value"] for c in report["choices"] if c["setting"] == "train.lambda_max")
    print(f"lambda_max {lam:.4g} (measured in {time.perf_counter() - t0:.1f}s); "
          f"{args.epochs} epochs, batch {base.train.batch_size}, constant rate", flush=True)  # fmt: skip

    runs = [("async", w, c) for w in (2, 3, 4) for c in (False, True)]
    rows = []
    for k in ks:
        for mode, world, capped in runs:
            name = f"k{k}-{mode}-{world}-{'cap' if capped else 'nocap'}"
            spec = base.with_train(mode=mode, world_size=world, lr=k / lam,
                                   lambda_max=lam if capped else None)  # fmt: skip
            spec = dataclasses.replace(spec, out_dir=str(args.work / "runs" / name))
            result = launch_processes(spec)
            history = result["history"]
            rows.append(
                (k, mode, world - (mode == "async"), capped, result, outcome(history, classes))
            )
            print(f"  {name}: val_loss " + " ".join(f"{h['val_loss']:.4g}" for h in history)
                  + f"  {rows[-1][-1]}", flush=True)  # fmt: skip

    print(f"\n{'eta0 x lambda':>13}{'mode':>7}{'workers':>8}{'cap':>5}{'tau p95':>8}"
          f"{'rate used':>11}{'val loss':>10}{'val acc':>9}{'outcome':>10}")  # fmt: skip
    for k, mode, workers, capped, result, what in rows:
        tau = result.get("async_staleness_p95", 0.0)
        rate = min(k / lam, result.get("async_lr_cap", math.inf))
        print(f"{k:>13.2f}{mode:>7}{workers:>8}{'yes' if capped else 'no':>5}{tau:>8.0f}"
              f"{rate * lam:>11.3f}{result['val_loss']:>10.4f}{result['val_accuracy']:>9.4f}"
              f"{what:>10}")  # fmt: skip


if __name__ == "__main__":
    main()
