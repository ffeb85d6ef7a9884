"""The ``Trainer``: data-parallel training of the n-gram classifier under a wall-clock budget.

One class serves every launcher (TorchDistributor local or on barrier executors, torchrun): it
expects an initialized process group and reads rank and world size from it. All ranks agree on
when to stop through a collective (never by their own clocks alone), so they stop at the same
step. Only rank 0 writes the model and the result.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from pipelines.errors import ConfigError
from trainers.data import check_featurizer, load_manifest, read_split
from trainers.model import ModelSpec, NgramClassifier

MODEL_FILE = "model.pt"
RESULT_FILE = "train_result.json"
STOP_CHECK_EVERY = 8  # steps between stop votes: one tiny all-reduce, not one per step
PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class PrecisionPlan:
    """How a precision runs on a device: parameter dtype, autocast dtype, gradient scaler."""

    name: str
    param_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    use_scaler: bool


def select_precision(precision: str, device_type: str) -> PrecisionPlan:
    """``fp64``/``fp32`` run natively; ``bf16`` autocasts (CPU and GPU); ``fp16`` autocasts
    with a gradient scaler and needs a GPU."""
    if precision == "fp64":
        return PrecisionPlan(precision, torch.float64, None, False)
    if precision == "fp32":
        return PrecisionPlan(precision, torch.float32, None, False)
    if precision == "bf16":
        return PrecisionPlan(precision, torch.float32, torch.bfloat16, False)
    if precision == "fp16":
        if device_type != "cuda":
            raise ConfigError(
                "train.precision = fp16 needs a GPU (train.use_gpu=true on CUDA nodes); "
                "on CPU use bf16 or fp32"
            )
        return PrecisionPlan(precision, torch.float32, torch.float16, True)
    raise ConfigError(f"train.precision = {precision!r}: allowed fp64, fp32, bf16, fp16")


def select_device(use_gpu: bool, local_rank: int, cuda_available: bool) -> tuple[torch.device, str]:
    """One CUDA device per local rank with NCCL, or the CPU with gloo."""
    if use_gpu:
        if not cuda_available:
            raise ConfigError("train.use_gpu = true but CUDA is not available on this node")
        return torch.device("cuda", local_rank), "nccl"
    return torch.device("cpu"), "gloo"


class Trainer:
    """Train, evaluate and checkpoint one rank's part of a data-parallel run."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.cfg = spec["train"]
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device, _ = select_device(self.cfg["use_gpu"], local_rank, torch.cuda.is_available())
        self.precision = select_precision(self.cfg["precision"], self.device.type)
        shard_dir = Path(spec["shard_dir"])
        manifest = load_manifest(shard_dir)
        check_featurizer(manifest, spec["featurizer"], str(shard_dir))
        self.labels: list[str] = manifest["labels"]
        self.train_data = read_split(shard_dir, "train", self.rank, self.world_size)
        self.val_data = read_split(shard_dir, "validation", self.rank, self.world_size)
        torch.manual_seed(self.cfg["seed"])
        self.model_spec = ModelSpec(
            num_buckets=spec["featurizer"]["num_buckets"],
            dim=spec["model"]["dim"],
            hidden=tuple(spec["model"]["hidden"]),
            num_classes=max(len(self.labels), 1),
        )
        # NCCL cannot all-reduce sparse gradients: dense embedding gradients on GPUs.
        model = NgramClassifier(self.model_spec, sparse=self.device.type == "cpu")
        self.model = model.to(self.device, dtype=self.precision.param_dtype)
        self.ddp = (
            DistributedDataParallel(self.model)
            if self.device.type == "cpu"
            else (DistributedDataParallel(self.model, device_ids=[self.device.index]))
        )
        self.optimizer = torch.optim.Adagrad(self.ddp.parameters(), lr=self.cfg["lr"])
        self.scaler = torch.amp.GradScaler("cuda") if self.precision.use_scaler else None
        self.step = 0
        self.epoch = 0

    # --- pieces -------------------------------------------------------------------------

    def _autocast(self):  # noqa: ANN202
        if self.precision.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision.autocast_dtype)

    def _loss(self, batch: tuple[torch.Tensor, ...], model: torch.nn.Module) -> torch.Tensor:
        ids, offsets, labels, weights = (t.to(self.device, non_blocking=True) for t in batch)
        with self._autocast():
            logits = model(ids, offsets)
        logits = logits.to(self.precision.param_dtype)
        known = labels >= 0
        losses = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        w = weights.to(logits.dtype) * known
        return (losses * w).sum() / w.sum().clamp(min=1e-12)

    def train_step(self, batch: tuple[torch.Tensor, ...]) -> float:
        """One synchronous data-parallel step; returns the local loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(batch, self.ddp)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.step += 1
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, batch_size: int = 4096) -> dict[str, float]:
        """Weighted validation loss and accuracy, summed over all ranks."""
        self.model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        data = self.val_data
        for start in range(0, data.num_rows, batch_size):
            rows = np.arange(start, min(start + batch_size, data.num_rows))
            ids, offsets, labels, weights = (t.to(self.device) for t in data.batch(rows))
            with self._autocast():
                logits = self.model(ids, offsets).float()
            w = weights.double() * (labels >= 0)
            losses = F.cross_entropy(logits, labels.clamp(min=0), reduction="none").double()
            correct = (logits.argmax(1) == labels).double()
            totals += torch.stack([(losses * w).sum(), (correct * w).sum(), w.sum()])
        dist.all_reduce(totals)
        self.model.train()
        denom = max(float(totals[2]), 1e-12)
        return {"val_loss": float(totals[0]) / denom, "val_accuracy": float(totals[1]) / denom}

    def _agree(self, flag: bool) -> bool:
        """True on every rank when any rank says so."""
        vote = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX)
        return bool(vote.item() > 0)

    def _steps_per_epoch(self) -> int:
        local = torch.tensor([math.ceil(self.train_data.num_rows / self.cfg["batch_size"])],
                             device=self.device)  # fmt: skip
        dist.all_reduce(local, op=dist.ReduceOp.MIN)  # every rank must take the same steps
        return int(local.item())

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])

    # --- the loop -----------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Epochs until the budget, convergence (ρ) or ``epochs``; all ranks stop together."""
        budget = float(self.cfg["time_budget_s"])
        batch_size = int(self.cfg["batch_size"])
        dist.barrier()
        start = time.monotonic()
        steps_per_epoch = self._steps_per_epoch()
        if steps_per_epoch == 0:
            raise ConfigError("no training rows on some rank: more data or fewer train.world_size")
        stopped_by = "epochs"
        step_seconds = 0.0
        last_progress = start
        history: list[dict[str, float]] = []
        best_val = math.inf
        loss = math.nan
        for epoch in range(self.cfg["epochs"]):
            self.epoch = epoch
            order = np.random.default_rng([self.cfg["seed"], epoch, self.rank]).permutation(
                self.train_data.num_rows
            )
            out_of_time = False
            for i in range(steps_per_epoch):
                rows = order[i * batch_size : (i + 1) * batch_size]
                t0 = time.perf_counter()
                loss = self.train_step(self.train_data.batch(rows))
                step_seconds += time.perf_counter() - t0
                if self.step % STOP_CHECK_EVERY == 0 and self._agree(
                    time.monotonic() - start >= budget
                ):
                    out_of_time = True
                    break
                now = time.monotonic()
                if self.rank == 0 and now - last_progress >= PROGRESS_EVERY_S:
                    print(f"[train] epoch {epoch + 1} step {i + 1}/{steps_per_epoch} loss {loss:.4f} "
                          f"{now - start:.0f}s of {budget:.0f}s", flush=True)  # fmt: skip
                    last_progress = now
            metrics = self.evaluate()
            history.append({"epoch": epoch + 1, "step": self.step, "loss": loss, **metrics})
            if self.rank == 0:
                print(f"[train] epoch {epoch + 1}: val_loss {metrics['val_loss']:.4f} "
                      f"val_accuracy {metrics['val_accuracy']:.4f}", flush=True)  # fmt: skip
            if out_of_time:
                stopped_by = "budget"
                break
            improvement = best_val - metrics["val_loss"]
            best_val = min(best_val, metrics["val_loss"])
            if improvement < self.cfg["tolerance"]:
                stopped_by = "converged"
                break
            if self._agree(time.monotonic() - start >= budget):
                stopped_by = "budget"
                break
        time_used = time.monotonic() - start
        samples = self.step * batch_size * self.world_size
        result = {
            "stopped_by": stopped_by,
            "time_used_s": time_used,
            "steps": self.step,
            "epochs_run": len(history),
            "step_time_s": step_seconds / max(self.step, 1),
            "samples_per_s": samples / max(step_seconds, 1e-9),
            "train_loss": loss,
            "val_loss": history[-1]["val_loss"] if history else math.nan,
            "val_accuracy": history[-1]["val_accuracy"] if history else math.nan,
            "history": history,
            "model_capacity": self.model_spec.capacity,
            "n_train_local": self.train_data.num_rows,
        }
        if self.rank == 0:
            self._save(result)
        dist.barrier()
        return result

    def _save(self, result: dict[str, Any]) -> None:
        out = Path(self.spec["out_dir"])
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", torch.float32) for k, v in self.model.state_dict().items()}
        payload = {
            "state_dict": state,
            "model_spec": self.model_spec.to_dict(),
            "labels": self.labels,
            "featurizer": self.spec["featurizer"],
        }
        tmp = out / f".{MODEL_FILE}.tmp"
        torch.save(payload, tmp)
        tmp.replace(out / MODEL_FILE)
        (out / RESULT_FILE).write_text(json.dumps(result, indent=2))
