"""train: data-parallel PyTorch on the shards, launched by Spark's TorchDistributor.

Writes ``model.pt`` (weights, model spec, labels, featurizer settings), ``train_result.json``
(timings, stop reason, the validation curve), ``train_spec.json`` (what a ``torchrun`` launch of
the same training needs) and ``model/``, the MLflow pyfunc that predicts from raw text.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

if not __package__:  # started as a script by spark-submit: the project, not jobs/, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # (jobs/select.py would hide `select`)

from core.layout import CHECKPOINT_DIR, PYFUNC_DIR, TRAIN_SPEC_FILE, RunContext, StageResult
from trainers.data import load_manifest
from trainers.launch import launch_distributor
from trainers.serving import save_pyfunc
from trainers.spec import TrainSpec
from trainers.trainer import MODEL_FILE, RESULT_FILE

STAGE = "train"
TRAIN_METRICS = (
    "time_used_s", "steps", "step_time_s", "compute_time_s", "comm_fraction", "samples_per_s",
    "train_loss", "val_loss", "val_accuracy", "epochs_run", "resumed_from_step", "bytes_per_step",
)  # fmt: skip


def run(ctx: RunContext, out: Path) -> StageResult:
    shard_dir = ctx.require("shard")
    manifest = load_manifest(shard_dir)
    # Checkpoints live outside the stage folder while training runs, so that a rerun after a
    # failure (with or without --force) resumes; a finished run moves them into its output.
    checkpoints = ctx.run_dir / CHECKPOINT_DIR
    spec = TrainSpec.from_config(ctx.cfg, shard_dir, out, checkpoint_dir=checkpoints)
    spec.write(out / TRAIN_SPEC_FILE)
    _ = ctx.spark  # TorchDistributor runs inside the active Spark session
    result = launch_distributor(spec)
    save_pyfunc(out / MODEL_FILE, out / PYFUNC_DIR)
    if checkpoints.exists():
        shutil.move(str(checkpoints), str(out / "checkpoints"))
    n_train = int(manifest["splits"]["train"]["rows"])
    n_val = int(manifest["splits"]["validation"]["rows"])
    return StageResult(
        rows_in=n_train + n_val,
        rows_out=n_train + n_val,
        # what actually ran, which the config may leave to the trainer (train.kernel=auto)
        params=spec.params(manifest)
        | {
            "kernel": result["kernel"],
            "optimizer": result["optimizer"],
            "threads": spec.train.threads,
        },
        metrics={k: float(result[k]) for k in TRAIN_METRICS if result.get(k) is not None},
        series={
            "loss": [[step, loss] for step, loss in result["losses"]],
            "val_loss": [[h["step"], h["val_loss"]] for h in result["history"]],
            "val_accuracy": [[h["step"], h["val_accuracy"]] for h in result["history"]],
        },
        tags={"stopped_by": result["stopped_by"], "kernel_reason": result["kernel_reason"]},
        artifacts=[RESULT_FILE, TRAIN_SPEC_FILE],
        model=MODEL_FILE,
    )


if __name__ == "__main__":  # spark-submit jobs/<stage>.py: the CLI's one entry for a stage alone
    from pipelines.cli import stage_main

    sys.exit(stage_main(STAGE))
