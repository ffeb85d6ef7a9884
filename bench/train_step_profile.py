"""Where one training step's time goes, on one core: forward, backward, and each optimizer.

Random n-gram ids over the whole table (every row touched once first, so page faults do not
count), the default model and optimizers. This is the single-process part of a step;
``bench/train_throughput.py`` adds the data-parallel part (``comm_fraction``).

    .venv/bin/python bench/train_step_profile.py [--batch 256] [--ids-per-row 5] [--steps 100]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

from core.config import load_config
from trainers.model import ModelSpec, NgramClassifier
from trainers.trainer import build_optimizers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--ids-per-row", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--classes", type=int, default=12)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    torch.set_num_threads(1)
    cfg = load_config()
    spec = ModelSpec(cfg.featurizer.num_buckets, cfg.model.dim, cfg.model.hidden, args.classes)
    model = NgramClassifier(spec, sparse=True)
    optimizers = build_optimizers(model, cfg.train)
    every_row = torch.arange(spec.num_buckets)
    offsets = torch.arange(0, spec.num_buckets, 1024)
    F.cross_entropy(
        model(every_row, offsets), torch.zeros(len(offsets), dtype=torch.long)
    ).backward()
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    n = args.batch * args.ids_per_row
    timings = {"forward": 0.0, "backward": 0.0, **{type(o).__name__: 0.0 for o in optimizers}}
    for step in range(args.steps + 10):
        ids = torch.randint(0, spec.num_buckets, (n,))
        offs = torch.arange(0, n, args.ids_per_row)
        labels = torch.randint(0, args.classes, (args.batch,))
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(ids, offs), labels)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        spent = []
        for opt in optimizers:
            s0 = time.perf_counter()
            opt.step()
            spent.append(time.perf_counter() - s0)
            opt.zero_grad(set_to_none=True)
        if step >= 10:  # warm-up steps are not counted
            timings["forward"] += t1 - t0
            timings["backward"] += t2 - t1
            for opt, seconds in zip(optimizers, spent, strict=True):
                timings[type(opt).__name__] += seconds
    total = sum(timings.values())
    print(f"model {spec.capacity}, batch {args.batch}, {args.ids_per_row} ids per row, 1 thread")
    for name, seconds in timings.items():
        print(f"  {name:<12}{seconds / args.steps * 1e3:8.3f} ms/step  {seconds / total:6.1%}")
    print(
        f"  {'total':<12}{total / args.steps * 1e3:8.3f} ms/step  → {args.batch * args.steps / total:,.0f} samples/s"
    )


if __name__ == "__main__":
    main()
