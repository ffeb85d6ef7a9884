"""The error decomposition measures what it claims (docs/architecture.md, "Definitions"), on
generated data, averaged over training seeds, with real reference runs on a real Dask
LocalCluster:

- ``err_estim`` shrinks when the training rows grow 4×;
- ``err_approx`` shrinks when the capacity grows;
- ``err_optim`` shrinks when the time budget grows;

and a reference run in the calling process (a small training split's) gives what the Dask
worker gave.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

from core.layout import RunContext
from pipelines.stages import run_stage
from tests.conftest import config_for
from trainers.data import load_manifest
from trainers.decompose import FRACTIONS, decomposition, run_references
from trainers.spec import TrainSpec

pytestmark = pytest.mark.integration
SEEDS = (0, 1)


def _with(spec: TrainSpec, *, seed, dim=None, budget=60.0) -> TrainSpec:
    return spec.with_train(
        seed=seed,
        world_size=1,
        mode="sync",
        time_budget_s=budget,
        epochs=30,
        tolerance=1e-4,
        kernel="torch",  # as the evaluate stage's reference runs
    ).with_model(dim=dim or spec.model.dim)


def test_decomposition_terms_move_the_way_they_should(spark, tmp_path):
    cfg = config_for(tmp_path, "generate.num_events=30000", "generate.num_queries=3000",
                     "generate.num_labels=8", "model.dim=32", "dq.enabled=false")  # fmt: skip
    ctx = RunContext(cfg, "2026-11-01", spark=spark)
    for stage in ("generate", "ingest", "dedupe", "split", "shard"):  # fmt: skip
        run_stage(ctx, stage)
    test = pd.read_parquet(ctx.stage_dir("split") / "test")
    # every reference run trains into a temporary folder of its own
    base = TrainSpec.from_config(cfg, ctx.stage_dir("shard"), tmp_path / "train")
    n = int(load_manifest(ctx.stage_dir("shard"))["splits"]["train"]["rows"])
    small = [f / 4 for f in FRACTIONS]  # the same curve on a quarter of the rows
    jobs, keys = [], []
    for seed in SEEDS:
        for f in sorted(set(FRACTIONS) | set(small)):
            jobs.append((_with(base, seed=seed), f))
            keys.append(("n", seed, f))
        for f in FRACTIONS:
            jobs.append((_with(base, seed=seed, dim=2), f))
            keys.append(("tiny", seed, f))
        jobs.append((_with(base, seed=seed, budget=0.05), 1.0))
        keys.append(("short", seed, 1.0))
    results = dict(zip(keys, run_references(None, test, scheduler=None, workers=2, jobs=jobs),
                       strict=True))  # fmt: skip

    def terms(kind, seed, fractions, run_key, n_rows):
        refs = [dict(results[(kind, seed, f)], fraction=f / max(fractions)) for f in fractions]
        run = results[run_key]
        metrics, missing = decomposition(
            {"test_error": run["test_error"], "test_logloss": run["test_logloss"],
             "bayes_error": 0.0, "bayes_logloss": 0.0}, refs, n_rows)  # fmt: skip
        assert not [
            k for k in missing if k.endswith(("approx", "estim")) and "_logloss" not in k
        ], missing
        return metrics

    estim_full, estim_quarter, approx_big, approx_tiny, optim_long, optim_short = (
        [] for _ in range(6)
    )
    for seed in SEEDS:
        full = terms("n", seed, FRACTIONS, ("n", seed, 1.0), n)
        quarter = terms("n", seed, small, ("n", seed, 0.25), n // 4)
        tiny = terms("tiny", seed, FRACTIONS, ("tiny", seed, 1.0), n)
        short = terms("n", seed, FRACTIONS, ("short", seed, 1.0), n)
        estim_full.append(full["err_estim"])
        estim_quarter.append(quarter["err_estim"])
        approx_big.append(full["err_approx"])
        approx_tiny.append(tiny["err_approx"])
        optim_long.append(full["err_optim"])
        optim_short.append(short["err_optim"])
    print(f"err_estim n {np.mean(estim_full):.4f} vs n/4 {np.mean(estim_quarter):.4f}; err_approx "
          f"dim 32 {np.mean(approx_big):.4f} vs dim 2 {np.mean(approx_tiny):.4f}; err_optim "
          f"converged {np.mean(optim_long):.4f} vs 0.05 s {np.mean(optim_short):.4f}")  # fmt: skip
    assert np.mean(estim_full) < np.mean(estim_quarter), (estim_full, estim_quarter)
    assert np.mean(approx_big) < np.mean(approx_tiny), (approx_big, approx_tiny)
    assert np.mean(optim_long) < np.mean(optim_short), (optim_long, optim_short)

    # a small training split's reference runs go in the calling process (no cluster to start):
    # the same numbers as on the Dask worker, and the process keeps its environment and threads
    threads, env = torch.get_num_threads(), dict(os.environ)
    job = jobs[keys.index(("n", 0, 0.125))]
    [here] = run_references(None, test, scheduler=None, workers=2, jobs=[job], in_process=True)
    there = results[("n", 0, 0.125)]
    assert here["test_error"] == pytest.approx(there["test_error"], abs=1e-9)
    assert here["test_logloss"] == pytest.approx(there["test_logloss"], rel=1e-5)
    assert torch.get_num_threads() == threads and dict(os.environ) == env
    assert not torch.distributed.is_initialized()
