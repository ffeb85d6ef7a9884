"""train: data-parallel PyTorch on the shards, launched by Spark's TorchDistributor.

Writes ``model.pt`` (weights, model spec, labels, featurizer settings), ``train_result.json``
(timings, stop reason, the validation curve), ``train_spec.json`` (what a ``torchrun`` launch of
the same training needs) and ``model/``, the MLflow pyfunc that predicts from raw text.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

if not __package__:  # started as a script by spark-submit: the project, not jobs/, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # (jobs/select.py would hide `select`)

from core.layout import CHECKPOINT_DIR, PYFUNC_DIR, RunContext, StageResult
from core.layout import TRAIN_SPEC_FILE as SPEC_FILE
from trainers.data import load_manifest
from trainers.featurizer import Featurizer
from trainers.launch import launch_distributor
from trainers.serving import save_pyfunc
from trainers.trainer import MODEL_FILE, RESULT_FILE

STAGE = "train"
TRAIN_METRICS = (
    "time_used_s", "steps", "step_time_s", "compute_time_s", "comm_fraction", "samples_per_s",
    "train_loss", "val_loss", "val_accuracy", "epochs_run", "resumed_from_step",
)  # fmt: skip


def build_spec(ctx: RunContext, out: Path, checkpoints: Path | None) -> dict:
    """What a training process needs: the shards, where to write, and the settings."""
    cfg = ctx.cfg
    return {
        "shard_dir": str(ctx.require("shard")),
        "out_dir": str(out),
        "checkpoint_dir": str(checkpoints) if checkpoints else None,
        "train": dataclasses.asdict(cfg.train),
        "model": {"dim": cfg.model.dim, "hidden": list(cfg.model.hidden)},
        "featurizer": Featurizer.from_config(cfg.featurizer).settings(),
    }


def run(ctx: RunContext, out: Path) -> StageResult:
    cfg = ctx.cfg
    shard_dir = ctx.require("shard")
    manifest = load_manifest(shard_dir)
    # Checkpoints live outside the stage folder while training runs, so that a rerun after a
    # failure (with or without --force) resumes; a finished run moves them into its output.
    checkpoints = ctx.run_dir / CHECKPOINT_DIR
    spec = build_spec(ctx, out, checkpoints)
    (out / SPEC_FILE).write_text(json.dumps(spec, indent=2))
    _ = ctx.spark  # TorchDistributor runs inside the active Spark session
    result = launch_distributor(
        spec, cfg.train.world_size, local_mode=cfg.train.local_mode, use_gpu=cfg.train.use_gpu
    )
    save_pyfunc(out / MODEL_FILE, out / PYFUNC_DIR)
    if checkpoints.exists():
        shutil.move(str(checkpoints), str(out / "checkpoints"))
    n_train = int(manifest["splits"]["train"]["rows"])
    n_val = int(manifest["splits"]["validation"]["rows"])
    t = cfg.train
    return StageResult(
        rows_in=n_train + n_val,
        rows_out=n_train + n_val,
        params={
            "precision": t.precision,
            "world_size": t.world_size,
            "mode": t.mode,
            "batch_size": t.batch_size,
            "lr": t.lr,
            "model_capacity": result["model_capacity"],
            "n_train": n_train,
            "time_budget_s": t.time_budget_s,
            "tolerance": t.tolerance,
            "seed": t.seed,
            "epochs": t.epochs,
            "optimizer": "adagrad",
        },  # fmt: skip
        metrics={k: float(result[k]) for k in TRAIN_METRICS if result.get(k) is not None},
        series={
            "loss": [[step, loss] for step, loss in result["losses"]],
            "val_loss": [[h["step"], h["val_loss"]] for h in result["history"]],
            "val_accuracy": [[h["step"], h["val_accuracy"]] for h in result["history"]],
        },
        tags={"stopped_by": result["stopped_by"]},
        artifacts=[RESULT_FILE, SPEC_FILE],
        model=MODEL_FILE,
    )


if __name__ == "__main__":  # spark-submit jobs/<stage>.py: the CLI's one entry for a stage alone
    from pipelines.cli import stage_main

    sys.exit(stage_main(STAGE))
