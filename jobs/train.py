"""train: data-parallel PyTorch on the shards, launched by Spark's TorchDistributor (or, with
``train.launcher=processes``, by torch.multiprocessing on this machine).

Writes ``model.pt`` (weights, model spec, labels, featurizer settings), ``train_result.json``
(timings, stop reason, the validation curve), ``train_spec.json`` (what a ``torchrun`` launch of
the same training needs) and ``model/``, the MLflow pyfunc that predicts from raw text.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

if not __package__:  # started as a script by spark-submit: the project, not jobs/, on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # (jobs/select.py would hide `select`)

from core.layout import CHECKPOINT_DIR, PYFUNC_DIR, TRAIN_SPEC_FILE, RunContext, StageResult
from trainers.data import check_shards, load_manifest
from trainers.launch import launch_distributor, launch_processes
from trainers.serving import save_pyfunc
from trainers.spec import TrainSpec
from trainers.trainer import MODEL_FILE, RESULT_FILE, spec_fingerprint

STAGE = "train"
AUTO_PLAN_FILE = "auto_plan.json"
TRAIN_METRICS = (
    "time_used_s", "steps", "planned_steps", "step_time_s", "compute_time_s", "comm_fraction",
    "samples_per_s", "train_loss", "val_loss", "val_accuracy", "epochs_run", "resumed_from_step",
    "bytes_per_step", "stop_vote_every",
    # async mode's parameter server
    "async_pushes_applied", "async_pushes_dropped", "async_pushes_per_s",
    "async_server_idle_fraction", "async_staleness_p95", "async_staleness_max",
    "async_lr_cap", "async_lr_capped_pushes",
)  # fmt: skip


def run(ctx: RunContext, out: Path) -> StageResult:
    shard_dir = ctx.require("shard")
    manifest = load_manifest(shard_dir)
    check_shards(shard_dir, manifest)
    # Checkpoints live outside the stage folder while training runs, so that a rerun after a
    # failure (with or without --force) resumes; a finished run moves them into its output.
    checkpoints = ctx.run_dir / CHECKPOINT_DIR
    spec = TrainSpec.from_config(ctx.cfg, shard_dir, out, checkpoint_dir=checkpoints)
    plan_params: dict[str, object] = {}
    if spec.train.auto:
        spec, plan_params = plan_training(spec, manifest, out)
    spec.write(out / TRAIN_SPEC_FILE)
    if spec.train.launcher == "processes":
        result = launch_processes(spec)
    else:
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
            "sync": result["sync"],
            "optimizer": result["optimizer"],
            "threads": spec.train.threads,
        }
        | plan_params,
        metrics={k: float(result[k]) for k in TRAIN_METRICS if result.get(k) is not None},
        series={
            "loss": [[step, loss] for step, loss in result["losses"]],
            "val_loss": [[h["step"], h["val_loss"]] for h in result["history"]],
            "val_accuracy": [[h["step"], h["val_accuracy"]] for h in result["history"]],
        }
        | (  # async mode: pushes by staleness τ, one point per τ (the step axis is τ)
            {"async_staleness_pushes": [[int(t), n] for t, n in result["async_staleness"].items()]}
            if "async_staleness" in result
            else {}
        ),
        tags={
            "stopped_by": result["stopped_by"],
            "kernel_reason": result["kernel_reason"],
            "sync_reason": result["sync_reason"],
        },
        artifacts=[RESULT_FILE, TRAIN_SPEC_FILE, *([AUTO_PLAN_FILE] if plan_params else [])],
        model=MODEL_FILE,
    )


def plan_training(
    spec: TrainSpec, manifest: dict, out: Path
) -> tuple[TrainSpec, dict[str, object]]:
    """``train.auto``: measure (or, after an interrupted run, reuse that run's plan, so that its
    checkpoints still match), print, keep the plan in ``out``; the spec to train with and the
    plan as params."""
    # the probes (torch.func, Hessian-vector products): only for a run that asks for them
    from trainers.autoplan import apply_plan, auto_params, configure

    kept = Path(spec.checkpoint_dir) / AUTO_PLAN_FILE if spec.checkpoint_dir else None
    asked = spec_fingerprint(spec, manifest)  # data and settings, not the budget
    report = json.loads(kept.read_text()) if kept is not None and kept.exists() else {}
    if report.get("for") == asked:
        tuned = apply_plan(spec, report)
        print(f"[train] auto: the interrupted run's plan ({kept})", file=sys.stderr, flush=True)
    else:
        print(f"[train] auto: measuring on {spec.train.auto_probe_rows} training rows within the "
              f"{spec.train.time_budget_s:.0f}s budget …", file=sys.stderr, flush=True)  # fmt: skip
        tuned, report = configure(spec, manifest)
        report["for"] = asked
        if kept is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text(json.dumps(report, indent=2))
    for choice in report["choices"]:
        print(f"[train] auto: {choice['setting']} = {choice['value']}  ({choice['why']})",
              file=sys.stderr, flush=True)  # fmt: skip
    print(f"[train] auto: measuring took {report['measuring_s']:.1f}s; training gets "
          f"{report['training_budget_s']:.0f}s", file=sys.stderr, flush=True)  # fmt: skip
    (out / AUTO_PLAN_FILE).write_text(json.dumps(report, indent=2))
    # the run's budget is the one asked for; the trainer's is what the measuring left of it
    return tuned, auto_params(report) | {"time_budget_s": report["budget_s"]}


if __name__ == "__main__":  # spark-submit jobs/<stage>.py: the CLI's one entry for a stage alone
    from pipelines.cli import stage_main

    sys.exit(stage_main(STAGE))
