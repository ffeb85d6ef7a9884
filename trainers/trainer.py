"""The ``Trainer``: data-parallel training of the n-gram classifier under a wall-clock budget.

One class serves every launcher (TorchDistributor local or on barrier executors, torchrun): it
expects an initialized process group and reads rank and world size from it. All ranks agree on
when to stop through a collective (never by their own clocks alone), so they stop at the same
step. Rank 0 writes atomic checkpoints every ``checkpoint_every`` steps; a rerun after a failure
loads the last one on every rank and goes on from that step, with the time already used counted
against the budget. Only rank 0 writes the model and the result.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
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

from core.config import TrainConfig
from core.errors import ConfigError
from trainers import async_ps
from trainers.data import ShardData, check_featurizer, load_manifest, read_split
from trainers.exchange import ReplicaAverage, RowExchange
from trainers.kernels import train_examples, warm_hogwild
from trainers.model import NgramClassifier, UnsafeFile, load_tensors
from trainers.shared import share_tensors
from trainers.spec import TrainSpec

MODEL_FILE = "model.pt"
RESULT_FILE = "train_result.json"
STOP_CHECK_EVERY = 8  # fewest steps between stop votes: one tiny all-reduce, not one per step
VOTE_EVERY_S = 0.05  # once timed, votes come about this often (a gloo all-reduce costs ~1 ms)
PROBE_EVERY = 25  # steps between compute-only probes that split step time into compute and comm
LOSS_EVERY = 10  # steps between recorded loss values (rank 0, logged to MLflow in one batch)
PROGRESS_EVERY_S = 5.0
PLAN_AFTER_STEPS = 20  # steps timed before the first plan of the learning-rate schedule
UNPLANNED_STEPS = 10**12  # the schedule's length until then, when no epoch cap bounds it
KEEP_CHECKPOINTS = 2
# Fault injection for the resume test: this rank kills itself at this step (first attempt only).
FAULT_RANK_ENV = "ZIPFLINE_FAULT_KILL_RANK"
FAULT_STEP_ENV = "ZIPFLINE_FAULT_KILL_AT_STEP"


def kill_this_process() -> None:
    """The injected fault: this process dies at once, as a crashed worker does (no cleanup)."""
    os.kill(os.getpid(), signal.SIGKILL)


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


WIRE_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
"""``train.exchange_precision`` → the gradients' type on the row exchange's wire (None: the
model's own)."""


def ddp_comm_hook(exchange_precision: str, backend: str):  # noqa: ANN201 (a torch hook)
    """DDP's communication hook for ``train.exchange_precision`` (DDP runs on GPUs, over
    NCCL): None for fp32 (DDP's own all-reduce), else the hook that compresses the gradient
    buckets to fp16 or bf16 for the all-reduce. bf16 is refused on any other backend (gloo's
    bf16 all-reduce is not to be relied on)."""
    # start-up speed: the hooks package (PowerSGD and the rest) only for a run that uses DDP
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    hooks = {"fp16": default_hooks.fp16_compress_hook, "bf16": default_hooks.bf16_compress_hook}
    if exchange_precision == "bf16" and backend != "nccl":
        raise ConfigError(
            f"train.exchange_precision = bf16 with DDP needs NCCL, not {backend}: use fp16"
        )
    return hooks.get(exchange_precision)


KERNEL_OPTIMIZER = {"sgd": "sgd", "adagrad": "rowwise_adagrad"}
"""``train.optimizer`` → the numba kernel's optimizer."""


def select_kernel(
    cfg: TrainConfig, device_type: str, hidden: tuple[int, ...], world_size: int
) -> tuple[str, str]:
    """The training loop that runs, ``numba`` or ``torch``, and why (logged with the run).

    The numba kernel is fastText's per-example update of the linear model on the CPU; it has no
    hidden layers, no mixed precision and no sparse Adam, and since it steps example by
    example, workers meet by averaging (``local_sgd``, which ``auto`` mode picks for it) or by
    sharing one copy of the weights (``shared``) rather than by exchanging gradients every step.
    ``train.kernel=numba`` where it cannot apply is a config error naming the reason."""
    blockers = [
        why
        for bad, why in (
            (device_type != "cpu", "it runs on the CPU (train.use_gpu=false)"),
            (bool(hidden), "it trains the linear model (model.hidden=[])"),
            (cfg.precision not in ("fp32", "fp64"), "it computes in fp32 or fp64"),
            (cfg.optimizer not in ("sgd", "adagrad"), "its optimizers are sgd and adagrad"),
            (
                cfg.mode == "async",
                "its workers step example by example, and async mode's push gradients of "
                "mini-batches (train.mode=async)",
            ),
            (
                cfg.mode == "sync" and world_size > 1,
                "workers average its models or share one (train.mode=local_sgd, shared or auto) "
                "rather than exchange gradients every step",
            ),
        )
        if bad
    ]
    if cfg.kernel == "torch":
        return "torch", "train.kernel=torch"
    if not blockers:
        return "numba", f"train.kernel={cfg.kernel}"
    if cfg.kernel == "numba":
        raise ConfigError(f"train.kernel = numba does not apply here: {'; '.join(blockers)}")
    return "torch", f"train.kernel=auto: torch, since the numba kernel needs: {blockers[0]}"


def what_runs(cfg: TrainConfig, device_type: str, hidden: tuple[int, ...]) -> tuple[str, str]:
    """The loop (``numba`` or ``torch``) and the mode (``sync``, ``local_sgd`` or ``shared``)
    that ``cfg`` resolves to: what ``auto`` settings become, for planners that must know before
    training (``shared`` falls back to ``local_sgd`` at launch where the workers cannot map one
    memory: see :func:`trainers.shared.share_tensors`)."""
    kernel, _ = select_kernel(cfg, device_type, hidden, cfg.world_size)
    sync = select_sync(cfg.mode, kernel, device_type, cfg.world_size)
    return kernel, {"average": "local_sgd", "shared": "shared", "async": "async"}.get(sync, "sync")


def select_sync(mode: str, kernel: str, device_type: str, world_size: int = 1) -> str:
    """How the replicas stay in step: ``shared`` (``train.mode=shared``, the numba kernel's
    workers: one copy of the weights that every worker updates, Hogwild!), ``average`` (local
    SGD, and the numba kernel otherwise: each replica steps alone and they are averaged every
    ``sync_every`` steps), ``exchange`` (sync mode on CPU: the touched rows' gradients of every
    step, ``trainers.exchange``) or ``ddp`` (sync mode on GPUs: DDP all-reduces the dense
    gradients over NCCL). ``auto`` mode is ``average`` for the numba kernel (averaged replicas
    generalize better than one shared copy where the budget leaves room to converge: the
    ``--budget`` planner picks ``shared`` where it does not) and sync for the torch loop.
    ``async`` (``train.mode=async``): rank 0 serves the parameters, the others push gradients
    to it (``trainers.async_ps``)."""
    if mode == "async":
        if world_size < 2:
            raise ConfigError(
                "train.mode = async needs train.world_size >= 2: rank 0 serves the parameters "
                "and the other ranks train"
            )
        return "async"
    if mode == "shared" and kernel != "numba":
        raise ConfigError(
            "train.mode = shared trains Hogwild! with the numba kernel, which does not run here "
            "(it needs train.kernel=auto or numba, the CPU, model.hidden=[], fp32 or fp64, "
            "train.optimizer sgd or adagrad)"
        )
    if mode == "shared" and world_size > 1:
        return "shared"
    if mode in ("local_sgd", "shared") or kernel == "numba":
        return "average"
    return "exchange" if device_type == "cpu" else "ddp"


def build_optimizers(model: NgramClassifier, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """One optimizer for the embedding table (fit for sparse gradients), one for the rest."""
    sparse = model.embedding.sparse
    emb = [model.embedding.weight]
    dense = model.dense_parameters()
    if cfg.optimizer == "sparse_adam" and not sparse:
        raise ConfigError("train.optimizer = sparse_adam needs a sparse embedding (CPU training)")
    embedding_opt = {
        "adagrad": lambda: torch.optim.Adagrad(emb, lr=cfg.lr),
        "sgd": lambda: torch.optim.SGD(emb, lr=cfg.lr),
        "sparse_adam": lambda: torch.optim.SparseAdam(emb, lr=cfg.lr),
    }[cfg.optimizer]()
    dense_opt = {
        "adagrad": lambda: torch.optim.Adagrad(dense, lr=cfg.dense_lr),
        "sgd": lambda: torch.optim.SGD(dense, lr=cfg.dense_lr, momentum=0.9),
        "adam": lambda: torch.optim.Adam(dense, lr=cfg.dense_lr),
    }[cfg.dense_optimizer]()
    return [embedding_opt, dense_opt]


def lr_factor(step: int, progress: float, schedule: str, warmup: int) -> float:
    """The multiplier of the base learning rates at ``step``, ``progress`` (0 to 1) of the way
    through the planned steps after the warm-up."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max(0.0, progress))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def advance(progress: float, step: int, total: int, warmup: int) -> float:
    """The schedule's progress after ``step``: the rest of the way spread evenly over the steps
    left of the ``total`` planned. With a fixed plan this is ``(step + 1 - warmup) / (total -
    warmup)``; when the plan changes (re-measured step time), the schedule bends but never
    turns back, so the learning rate only decays."""
    if step < warmup:
        return progress
    return min(1.0, progress + (1.0 - progress) / max(total - step, 1))


# How long and how far a run goes does not change what a checkpoint holds.
NOT_IN_FINGERPRINT = ("time_budget_s", "epochs", "timeout_s", "patience", "auto", "auto_probe_rows",
                      "auto_grad_rel_error", "auto_delta", "auto_lr_safety", "launcher")  # fmt: skip


def stop_vote_interval(step_seconds: float) -> int:
    """Steps between stop votes at ``step_seconds`` a step: about ``VOTE_EVERY_S`` apart, at
    least every ``STOP_CHECK_EVERY`` steps and at most every 100,000."""
    return min(max(STOP_CHECK_EVERY, math.ceil(VOTE_EVERY_S / max(step_seconds, 1e-9))), 10**5)


def spec_fingerprint(spec: TrainSpec, manifest: dict[str, Any]) -> str:
    """What a checkpoint must agree with to be resumed: data, model, and how it trains (not
    the budget, the epochs nor the collective timeout)."""
    payload = spec.settings_payload(leave_out=NOT_IN_FINGERPRINT) | {
        "shards": [f["sha256"] for s in manifest["splits"].values() for f in s["files"]],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def kernel_state_for(model: NgramClassifier) -> dict[str, torch.Tensor]:
    """The numba kernel's optimizer state for ``model``, zero: one row-wise Adagrad accumulator
    per embedding row and per class, in the weights' dtype."""
    weight = model.embedding.weight
    return {
        "emb_acc": torch.zeros(weight.shape[0], dtype=weight.dtype),
        "out_acc": torch.zeros(model.output.weight.shape[0], dtype=weight.dtype),
    }


def kernel_arrays(model: NgramClassifier, state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The model's weights and the kernel's state as numpy views of the same memory: the
    arguments :func:`trainers.kernels.train_examples` writes into."""
    with torch.no_grad():
        return {
            "emb": model.embedding.weight.detach().numpy(),
            "out_w": model.output.weight.detach().numpy(),
            "out_b": model.output.bias.detach().numpy(),
            "emb_acc": state["emb_acc"].numpy(),
            "out_acc": state["out_acc"].numpy(),
        }


class Trainer:
    """Train, evaluate and checkpoint one rank's part of a data-parallel run."""

    def __init__(self, spec: TrainSpec) -> None:
        self.spec = spec
        self.cfg = spec.train
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device, _ = select_device(self.cfg.use_gpu, local_rank, torch.cuda.is_available())
        self.precision = select_precision(self.cfg.precision, self.device.type)
        shard_dir = Path(spec.shard_dir)
        manifest = load_manifest(shard_dir)
        check_featurizer(manifest, spec.featurizer_settings(), str(shard_dir))
        self.fingerprint = spec_fingerprint(spec, manifest)
        self.labels: list[str] = manifest["labels"]
        self.train_rows_total = int(manifest["splits"]["train"]["rows"] * spec.train_fraction)
        torch.manual_seed(self.cfg.seed)
        self.model_spec = spec.model_spec(num_classes=max(len(self.labels), 1))
        # NCCL cannot all-reduce sparse gradients: dense embedding gradients on GPUs.
        model = NgramClassifier(self.model_spec, sparse=self.device.type == "cpu")
        self.model = model.to(self.device, dtype=self.precision.param_dtype)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.kernel, self.kernel_reason = select_kernel(
            self.cfg, self.device.type, self.model_spec.hidden, self.world_size
        )
        self.sync = select_sync(self.cfg.mode, self.kernel, self.device.type, self.world_size)
        self.wire_dtype = WIRE_DTYPES[self.cfg.exchange_precision]
        self.async_state: dict[str, Any] = {}  # the parameter server's counts (async mode)
        if self.sync == "async" and self.precision.use_scaler:
            raise ConfigError(
                "train.mode = async applies unscaled gradients: use precision bf16 or fp32, "
                "not fp16"
            )
        self._read_data(shard_dir)
        # The numba kernel's optimizer state: one accumulator per embedding row and per class
        # (row-wise Adagrad), torch tensors like the weights, so checkpoints carry them.
        self.kernel_state = kernel_state_for(self.model)
        # rows some step updated since the last average (uint8: the numba kernel writes it too)
        self._touched = torch.zeros(
            self.model_spec.num_buckets, dtype=torch.uint8, device=self.device
        )
        self._average = ReplicaAverage(self.model, self.world_size)
        self.sync_reason = f"train.mode={self.cfg.mode}"
        if self.cfg.mode == "shared" and self.world_size == 1:
            self.sync_reason = "train.mode=shared: one worker, nothing to share"
        if self.sync == "shared":
            why_not = share_tensors([*self.model.parameters(), *self.kernel_state.values()])
            if why_not:
                self.sync, self.sync_reason = "average", f"train.mode=shared: local SGD, {why_not}"
                if self.rank == 0:
                    print(f"[train] {self.sync_reason}", flush=True)
        self.local_sgd, self.exchange_rows = self.sync == "average", self.sync == "exchange"
        self.shared = self.sync == "shared"
        self.exchange = (
            RowExchange(self.model, self.world_size, self.wire_dtype)
            if self.exchange_rows
            else None
        )
        self.ddp = self.model
        if self.sync == "ddp":
            self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)
            hook = ddp_comm_hook(self.cfg.exchange_precision, dist.get_backend())
            if hook is not None:
                self.ddp.register_comm_hook(None, hook)  # state None: the default group
        self.comm_seconds = 0.0
        self.bytes_sent = 0  # what this rank sent: model averages, or the gradient exchange
        self.optimizers = [] if self.kernel == "numba" else build_optimizers(self.model, self.cfg)
        self.base_lrs = [[g["lr"] for g in opt.param_groups] for opt in self.optimizers]
        self.scaler = torch.amp.GradScaler("cuda") if self.precision.use_scaler else None
        self.checkpoint_dir = Path(spec.checkpoint_dir) if spec.checkpoint_dir else None
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.time_used_before = 0.0
        self.resumed_from_step: int | None = None
        self.history: list[dict[str, float]] = []
        self.losses: list[tuple[int, float]] = []
        self.best_val = math.inf
        self.evals_without_gain = 0  # evaluations in a row that did not beat best_val by ρ
        self.total_steps = 1  # the planned steps, over which the learning rates decay
        self.progress = 0.0  # how far through them the schedule is (see `advance`)
        self.stopped_by: str | None = None  # set once training has ended (kept in checkpoints)
        self.vote_every = STOP_CHECK_EVERY  # steps between stop votes, agreed in `_plan`

    def _read_data(self, shard_dir: Path) -> None:
        """This rank's training and validation rows. In async mode the workers split the
        training rows among themselves and the server (rank 0) evaluates on all of the
        validation rows; elsewhere every rank has its share of both."""
        train, val = (self.rank, self.world_size), (self.rank, self.world_size)
        if self.sync == "async":
            train, val = (
                (None, (0, 1))
                if self.rank == 0
                else (async_ps.worker_share(self.rank, self.world_size), None)
            )
        self.train_data = read_split(shard_dir, "train", *train) if train else ShardData.empty()
        # reference runs of the error decomposition learn from a seeded share of the rows
        self.train_data = self.train_data.sample(
            self.spec.train_fraction, self.cfg.seed + self.rank
        )
        self.val_data = read_split(shard_dir, "validation", *val) if val else ShardData.empty()

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

    def loss_of(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The weighted loss of ``batch`` on this rank's model (async mode's workers)."""
        return self._loss(batch, self.model)

    def lr_factor_now(self) -> float:
        """The schedule's multiplier of the base learning rates at this step."""
        return lr_factor(self.step, self.progress, self.cfg.lr_schedule, self.cfg.warmup_steps)

    def _set_lr(self) -> None:
        factor = self.lr_factor_now()
        for opt, bases in zip(self.optimizers, self.base_lrs, strict=True):
            for group, base in zip(opt.param_groups, bases, strict=True):
                group["lr"] = base * factor

    def train_step(self, batch: tuple[torch.Tensor, ...]) -> tuple[float, float]:
        """One synchronous data-parallel step; returns the local loss and the seconds spent in
        forward + backward (gradient all-reduce included)."""
        self._set_lr()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = self._loss(batch, self.ddp)
        if self.local_sgd:
            self._touched[batch[0].to(self.device)] = 1
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            fwd_bwd = time.perf_counter() - t0
            for opt in self.optimizers:
                self.scaler.step(opt)
            self.scaler.update()
        else:
            loss.backward()
            fwd_bwd = time.perf_counter() - t0
            if self.exchange is not None and self.world_size > 1:
                self.bytes_sent += self.exchange()
                self.comm_seconds += time.perf_counter() - t0 - fwd_bwd
            for opt in self.optimizers:
                opt.step()
        self._count_step()
        return float(loss.detach()), fwd_bwd

    @property
    def optimizer_name(self) -> str:
        """The optimizers that actually run: the kernel's, the parameter server's SGD scaled by
        staleness, or the embedding's + the dense one's."""
        if self.sync == "async":
            return "stale_sgd"
        if self.kernel == "numba":
            return KERNEL_OPTIMIZER[self.cfg.optimizer]
        return f"{self.cfg.optimizer}+{self.cfg.dense_optimizer}"

    def kernel_lr_range(self) -> tuple[float, float]:
        """The numba kernel's learning rate at this step's start and end (the next step's)."""
        cfg, warmup = self.cfg, self.cfg.warmup_steps
        after = advance(self.progress, self.step, self.total_steps, warmup)
        return (
            cfg.lr * lr_factor(self.step, self.progress, cfg.lr_schedule, warmup),
            cfg.lr * lr_factor(self.step + 1, after, cfg.lr_schedule, warmup),
        )

    def _count_step(self) -> None:
        """One more step done: the step counter and the schedule's progress move on."""
        self.progress_after(self.step)
        self.step += 1

    def progress_after(self, step: int) -> None:
        """The schedule's progress moves on past ``step``."""
        self.progress = advance(self.progress, step, self.total_steps, self.cfg.warmup_steps)

    def kernel_step(self, rows: np.ndarray) -> float:
        """One step of the numba kernel: the examples ``rows`` one by one, the learning rate
        going linearly from this step's value to the next one's; returns their weighted mean
        loss (before each example's update)."""
        data, cfg = self.train_data, self.cfg
        lr_start, lr_end = self.kernel_lr_range()
        total = train_examples(
            data.ids, data.row_offsets, data.labels, data.weights, rows,
            lr_start=lr_start, lr_end=lr_end, **self._kernel_arrays(),
            optimizer=KERNEL_OPTIMIZER[cfg.optimizer], threads=cfg.threads,
            touched=self._touched.numpy(),  # the rows to average at the next meeting
        )  # fmt: skip
        self._count_step()
        weight = float((data.weights[rows] * (data.labels[rows] >= 0)).sum())
        return total / max(weight, 1e-12)

    def _kernel_arrays(self) -> dict[str, np.ndarray]:
        return kernel_arrays(self.model, self.kernel_state)

    def _warm_kernel(self) -> None:
        """Compile (or load from numba's cache) the kernel before the clock starts."""
        data = self.train_data
        train_examples(
            data.ids, data.row_offsets, data.labels, data.weights, np.zeros(0, dtype=np.int64),
            lr_start=0.0, lr_end=0.0, **self._kernel_arrays(),
            optimizer=KERNEL_OPTIMIZER[self.cfg.optimizer], threads=1,
        )  # fmt: skip
        if self.cfg.threads > 1:
            warm_hogwild(self._kernel_arrays()["emb"].dtype)

    def _compute_probe(self, batch: tuple[torch.Tensor, ...]) -> float:
        """Forward + backward without the gradient all-reduce, gradients thrown away: the
        compute part of a step, to split step time into compute and communication."""
        t0 = time.perf_counter()
        with self.ddp.no_sync():
            self._loss(batch, self.ddp).backward()
        seconds = time.perf_counter() - t0
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return seconds

    @torch.no_grad()
    def average_models(self) -> None:
        """Local SGD: make every replica the mean of all. Dense layers are averaged whole; of
        the embedding only the rows that some rank touched since the last average (the others
        are equal everywhere already). In shared mode the ranks only meet: every rank has
        stopped writing the one copy before it is read (evaluated, saved)."""
        if self.shared:
            t0 = time.perf_counter()
            dist.barrier()  # waiting for the slowest rank: counted as communication
            self.comm_seconds += time.perf_counter() - t0
            return
        if not self.local_sgd:
            return
        if self.world_size == 1:
            return  # one replica agrees with itself
        t0 = time.perf_counter()
        self.bytes_sent += self._average(self._touched)  # and clears the touched flags
        self.comm_seconds += time.perf_counter() - t0

    def param_checksum(self) -> float:
        """Sum of all parameters: equal on every rank when the replicas agree."""
        return float(sum(p.detach().double().sum() for p in self.model.parameters()))

    @torch.no_grad()
    def evaluate(self, batch_size: int = 4096, *, reduce: bool = True) -> dict[str, float]:
        """Weighted validation loss and accuracy, summed over all ranks (or, ``reduce=False``,
        of this rank's validation rows alone: the parameter server's)."""
        self.average_models()
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
        if reduce:
            dist.all_reduce(totals)
        self.model.train()
        denom = max(float(totals[2]), 1e-12)
        return {"val_loss": float(totals[0]) / denom, "val_accuracy": float(totals[1]) / denom}

    def _agree(self, flag: bool) -> bool:
        """True on every rank when any rank says so."""
        vote = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX)
        return bool(vote.item() > 0)

    def _plan(
        self, start: float, launch: tuple[float, int], cap: int | None, out_of_time: bool = False
    ) -> bool:
        """Plan the steps the learning rates decay over: those the rest of the budget leaves
        room for at this launch's wall time per step so far (evaluations and checkpoints
        included), at most ``cap``; every rank takes the smallest plan. The ranks also agree on
        the steps between stop votes: about ``VOTE_EVERY_S`` apart at the slowest rank's pace,
        so that short steps (the numba kernel's) do not spend a tenth of their time voting.
        The same all-reduce carries a stop vote: True on every rank when any rank says it is
        ``out_of_time``."""
        now = time.monotonic()
        per_step = (now - launch[0]) / max(self.step - launch[1], 1)
        room = max(self.cfg.time_budget_s - (now - start), 0.0) / max(per_step, 1e-9)
        vote = stop_vote_interval(per_step)
        agreed = torch.tensor(
            [float(self.step + math.floor(room)), float(vote), -1.0 if out_of_time else 0.0],
            dtype=torch.float64, device=self.device,
        )  # fmt: skip
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        planned, self.vote_every = int(agreed[0].item()), int(agreed[1].item())
        total = planned if cap is None else min(cap, planned)
        # past the plan, the schedule ends with the next step; a capped run that has reached its
        # cap (a vote on its last step) keeps the cap as its plan
        self.total_steps = (
            cap if cap is not None and self.step >= cap else max(total, self.step + 1)
        )
        return bool(agreed[2].item() < 0)

    def _vote(self, start: float, launch: tuple[float, int], cap: int | None) -> bool:
        """The stop vote every ``vote_every`` steps: True on every rank when any rank is out of
        time. Once the first plan is made, each vote re-plans the schedule in the same
        all-reduce, so that the learning rates follow the pace when it changes (a machine
        shared with other jobs) and still reach their end as the budget runs out."""
        out_of_time = time.monotonic() - start >= self.cfg.time_budget_s
        if self.step - launch[1] <= PLAN_AFTER_STEPS:
            return self._agree(out_of_time)
        return self._plan(start, launch, cap, out_of_time)

    def _steps_per_epoch(self) -> int:
        local = torch.tensor([math.ceil(self.train_data.num_rows / self.cfg.batch_size)],
                             device=self.device)  # fmt: skip
        dist.all_reduce(local, op=dist.ReduceOp.MIN)  # every rank must take the same steps
        return int(local.item())

    # --- state and checkpoints ----------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "time_used_s": self.time_used_before,
            "history": self.history,
            "losses": self.losses,
            "best_val": self.best_val,
            "evals_without_gain": self.evals_without_gain,
            "progress": self.progress,
            "total_steps": self.total_steps,
            "stopped_by": self.stopped_by,
            "fingerprint": self.fingerprint,
            "kernel_state": self.kernel_state,
            "async": self.async_state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        for opt, opt_state in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.time_used_before = float(state["time_used_s"])
        self.history = list(state["history"])
        self.losses = [tuple(x) for x in state["losses"]]
        self.best_val = float(state["best_val"])
        self.evals_without_gain = int(state.get("evals_without_gain", 0))
        self.progress = float(state.get("progress", 0.0))
        self.total_steps = int(state.get("total_steps", 1))
        self.stopped_by = state.get("stopped_by")
        for name, value in (state.get("kernel_state") or {}).items():
            self.kernel_state[name].copy_(value)
        self.async_state = dict(state.get("async") or {})

    def _checkpoints(self) -> list[Path]:
        if self.checkpoint_dir is None or not self.checkpoint_dir.is_dir():
            return []
        return sorted(
            self.checkpoint_dir.glob("ckpt-*.pt"), key=lambda p: int(p.stem.split("-")[1])
        )

    def save_checkpoint(self, time_used: float) -> None:
        """Rank 0 writes ``ckpt-<step>.pt`` atomically and keeps the last few; all ranks wait."""
        self.average_models()  # local SGD: a checkpoint holds the consensus model
        if self.rank == 0:
            self.write_checkpoint(time_used)
        dist.barrier()

    def write_checkpoint(self, time_used: float) -> None:
        """``ckpt-<step>.pt``, written atomically by this rank alone; the last few are kept."""
        if self.checkpoint_dir is not None:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            self.time_used_before, saved = time_used, self.time_used_before
            state = self.state_dict()
            self.time_used_before = saved
            tmp = self.checkpoint_dir / f".ckpt-{self.step}.pt.tmp"
            torch.save(state, tmp)
            tmp.replace(self.checkpoint_dir / f"ckpt-{self.step}.pt")
            for old in self._checkpoints()[:-KEEP_CHECKPOINTS]:
                old.unlink(missing_ok=True)

    def resume(self) -> bool:
        """Load the newest checkpoint that matches this run, on every rank."""
        for path in reversed(self._checkpoints()):
            try:
                state = load_tensors(path, map_location=self.device)
            except UnsafeFile as exc:  # never unpickle code: the one before, or afresh
                if self.rank == 0:
                    print(f"[train] {exc}", flush=True)
                continue
            except Exception as exc:  # a torn or foreign file: try the one before
                if self.rank == 0:
                    print(f"[train] skipping unreadable checkpoint {path.name}: {exc}", flush=True)
                continue
            if state.get("fingerprint") != self.fingerprint:
                if self.rank == 0:
                    print(f"[train] checkpoint {path.name} is from other data or settings; "
                          "starting afresh", flush=True)  # fmt: skip
                return False
            self.load_state_dict(state)
            self.resumed_from_step = self.step
            if self.rank == 0:
                print(f"[train] resumed from {path.name} (step {self.step}, epoch {self.epoch + 1})",
                      flush=True)  # fmt: skip
            return True
        return False

    def maybe_fault(self) -> None:
        """The injected fault of the resume tests, at its rank and step (first attempt only)."""
        if (
            self.resumed_from_step is None
            and os.environ.get(FAULT_RANK_ENV) == str(self.rank)
            and os.environ.get(FAULT_STEP_ENV) == str(self.step)
        ):
            kill_this_process()

    # --- the loop -----------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Epochs until the budget, convergence (ρ) or ``epochs``; all ranks stop together."""
        budget = self.cfg.time_budget_s
        batch_size = self.cfg.batch_size
        self.resume()
        if self.sync == "async":
            return self._finish(self._train_async())
        if self.kernel == "numba":
            self._warm_kernel()
        dist.barrier()
        start = time.monotonic() - self.time_used_before
        steps_per_epoch = self._steps_per_epoch()
        if steps_per_epoch == 0:
            raise ConfigError("no training rows on some rank: more data or fewer train.world_size")
        max_epochs = self.cfg.epochs or math.inf
        cap = steps_per_epoch * self.cfg.epochs if self.cfg.epochs else None
        self.start_schedule(cap)
        launch = (time.monotonic(), self.step)
        every = self.cfg.checkpoint_every
        stopped_by = self.stopped_by or "epochs"
        step_seconds = probe_seconds = probe_fwd_bwd = probe_steps_seconds = 0.0
        samples = 0
        last_progress = time.monotonic()
        loss = math.nan
        while self.stopped_by is None and self.epoch < max_epochs:
            epoch = self.epoch
            order = np.random.default_rng([self.cfg.seed, epoch, self.rank]).permutation(
                self.train_data.num_rows
            )
            out_of_time = False
            while self.step_in_epoch < steps_per_epoch:
                i = self.step_in_epoch
                rows = order[i * batch_size : (i + 1) * batch_size]
                probe = False
                if self.kernel == "numba":
                    t0 = time.perf_counter()
                    loss, fwd_bwd = self.kernel_step(rows), 0.0
                else:
                    batch = self.train_data.batch(rows)
                    if (
                        not self.local_sgd
                        and not self.exchange_rows
                        and self.step % PROBE_EVERY == PROBE_EVERY - 1
                    ):
                        probe_seconds += self._compute_probe(batch)
                        probe = True
                    t0 = time.perf_counter()
                    loss, fwd_bwd = self.train_step(batch)
                seconds = time.perf_counter() - t0
                step_seconds += seconds
                if probe:
                    probe_fwd_bwd += fwd_bwd
                    probe_steps_seconds += seconds
                samples += len(rows)
                self.step_in_epoch += 1
                if self.step % LOSS_EVERY == 0:
                    self.losses.append((self.step, loss))
                self.maybe_fault()
                if self.local_sgd and self.step % self.cfg.sync_every == 0:
                    self.average_models()
                if every and self.step % every == 0:
                    self.save_checkpoint(time.monotonic() - start)
                if self.step % self.vote_every == 0 and self._vote(start, launch, cap):
                    out_of_time = True
                    break
                if self.step - launch[1] == PLAN_AFTER_STEPS:
                    self._plan(start, launch, cap)
                now = time.monotonic()
                if self.rank == 0 and now - last_progress >= PROGRESS_EVERY_S:
                    print(f"[train] epoch {epoch + 1} step {i + 1}/{steps_per_epoch} loss {loss:.4f} "
                          f"{now - start:.0f}s of {budget:.0f}s", flush=True)  # fmt: skip
                    last_progress = now
            metrics = self.evaluate()
            self.log_evaluation(epoch + 1, metrics, loss)
            if out_of_time:
                stopped_by = "budget"
                break
            self.epoch += 1
            self.step_in_epoch = 0
            if self.converged(metrics["val_loss"]):
                stopped_by = "converged"
                break
            if self._agree(time.monotonic() - start >= budget):
                stopped_by = "budget"
                break
            if self.epoch < max_epochs and self.step - launch[1] >= PLAN_AFTER_STEPS:
                self._plan(start, launch, cap)
        time_used = time.monotonic() - start
        self.stopped_by = stopped_by
        self.save_checkpoint(time_used)
        steps_here = self.step - (self.resumed_from_step or 0)
        step_time = step_seconds / max(steps_here, 1)
        # Communication: timed where this rank does it (model averages outside the steps, the
        # gradient exchange inside them); under DDP, on probe steps, the time the all-reduce
        # adds to the same forward + backward without it, as a share of those steps' time.
        comm_fraction = math.nan
        outside = self.comm_seconds if self.local_sgd or self.shared else 0.0  # not in steps
        if self.local_sgd or self.shared:
            comm_fraction = self.comm_seconds / max(step_seconds + self.comm_seconds, 1e-9)
        elif self.exchange_rows:
            comm_fraction = min(1.0, self.comm_seconds / max(step_seconds, 1e-9))
        elif probe_steps_seconds > 0:
            comm = max(0.0, probe_fwd_bwd - probe_seconds)
            comm_fraction = min(1.0, comm / probe_steps_seconds)
        return self._finish(
            self._result()
            | {
                "train_rows": self.train_data.num_rows,
                "time_used_s": time_used,
                "step_time_s": step_time,
                "compute_time_s": step_time * (1.0 - comm_fraction),
                "comm_fraction": comm_fraction,
                "samples_per_s": samples * self.world_size / max(step_seconds + outside, 1e-9),
                "train_loss": loss,
                "bytes_per_step": self.bytes_sent / max(steps_here, 1)
                if self.local_sgd or self.exchange_rows or self.shared
                else math.nan,
                "stop_vote_every": self.vote_every,
            }
        )

    def _result(self) -> dict[str, Any]:
        """What every mode's result says: where and why it stopped, the validation curve,
        and what ran."""
        return {
            "stopped_by": self.stopped_by,
            "steps": self.step,
            "planned_steps": None if self.total_steps >= UNPLANNED_STEPS else self.total_steps,
            "resumed_from_step": self.resumed_from_step,
            "epochs_run": len(self.history),
            "val_loss": self.history[-1]["val_loss"] if self.history else math.nan,
            "val_accuracy": self.history[-1]["val_accuracy"] if self.history else math.nan,
            "history": self.history,
            "losses": self.losses,
            "model_capacity": self.model_spec.capacity,
            "world_size": self.world_size,
            "device": str(self.device),
            "kernel": self.kernel,
            "kernel_reason": self.kernel_reason,
            "sync": self.sync,
            "sync_reason": self.sync_reason,
            "optimizer": self.optimizer_name,
            "precision": self.precision.name,
        }

    def log_evaluation(self, epoch: int, metrics: dict[str, float], loss: float) -> None:
        """Keep an evaluation in the history (and print it on rank 0)."""
        self.history.append({"epoch": epoch, "step": self.step, "loss": loss, **metrics})
        if self.rank == 0:
            print(f"[train] epoch {epoch}: val_loss {metrics['val_loss']:.4f} "
                  f"val_accuracy {metrics['val_accuracy']:.4f}", flush=True)  # fmt: skip

    def converged(self, val_loss: float) -> bool:
        """Count an evaluation against ρ and the patience: True once ``patience`` evaluations in
        a row have not improved on the best validation loss by ``tolerance`` (and the run may
        stop early)."""
        if self.best_val - val_loss >= self.cfg.tolerance:
            self.evals_without_gain = 0
        else:
            self.evals_without_gain += 1
        self.best_val = min(self.best_val, val_loss)
        return self.spec.early_stop and self.evals_without_gain >= self.cfg.patience

    def start_schedule(self, cap: int | None) -> None:
        """The steps the learning rates decay over until the first plan: ``cap`` (epochs ×
        steps per epoch) or none; a resumed run keeps its plan until it has timed steps of its
        own."""
        if self.resumed_from_step is None or self.total_steps <= 1:
            self.total_steps = cap or UNPLANNED_STEPS
        elif cap is not None:
            self.total_steps = min(self.total_steps, cap)

    def plan_pushes(
        self, start: float, launch: tuple[float, int], version: int, cap: int | None
    ) -> None:
        """Async mode's plan, on the server alone: the steps (applied pushes, the server's
        versions) the learning rate decays over are those the rest of the budget leaves room
        for at this launch's applied pushes per second since ``launch`` (its time and version),
        at most ``cap``."""
        now = time.monotonic()
        per_push = (now - launch[0]) / max(version - launch[1], 1)
        room = max(self.cfg.time_budget_s - (now - start), 0.0) / max(per_push, 1e-9)
        total = self.step + math.floor(room)
        self.total_steps = max(total if cap is None else min(cap, total), self.step + 1)

    def _train_async(self) -> dict[str, Any]:
        """``train.mode=async``: rank 0 serves, the other ranks work (``trainers.async_ps``)."""
        dist.barrier()
        part = async_ps.serve(self) if self.rank == 0 else async_ps.work(self)
        return (
            self._result()
            | {
                "train_rows": self.train_rows_total if self.rank == 0 else self.train_data.num_rows,
                "compute_time_s": part.get("step_time_s", math.nan),
                "stop_vote_every": None,
            }
            | part
        )

    def _finish(self, result: dict[str, Any]) -> dict[str, Any]:
        """Rank 0 saves the model and the result; every rank records where it stopped."""
        if self.rank == 0:
            self._save(result)
        # Every rank records where it stopped: they must agree (checked by the tests).
        ranks = Path(self.spec.out_dir) / "ranks"
        ranks.mkdir(parents=True, exist_ok=True)
        (ranks / f"rank-{self.rank}.json").write_text(
            json.dumps(
                {k: result[k] for k in ("steps", "stopped_by", "epochs_run")}
                | {
                    "rank": self.rank,
                    "param_checksum": self.param_checksum(),
                    "master_addr": os.environ.get("MASTER_ADDR"),
                }  # fmt: skip
            )
        )
        dist.barrier()
        return result

    def _save(self, result: dict[str, Any]) -> None:
        out = Path(self.spec.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # cloned: a shared run's weights are views of one mapping that holds the optimizer
        # state too, and torch.save would write the whole of it
        state = {
            k: v.detach().to("cpu", torch.float32).clone()
            for k, v in self.model.state_dict().items()
        }
        payload = {
            "state_dict": state,
            "model_spec": self.model_spec.to_dict(),
            "labels": self.labels,
            "featurizer": self.spec.featurizer_settings(),
        }
        tmp = out / f".{MODEL_FILE}.tmp"
        torch.save(payload, tmp)
        tmp.replace(out / MODEL_FILE)
        (out / RESULT_FILE).write_text(json.dumps(result, indent=2))
