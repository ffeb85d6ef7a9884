"""``train.mode=async``: a parameter server inside the training job, over gloo point-to-point.

Rank 0 serves the parameters and trains nothing; ranks 1 … N−1 are workers, each with its own
share of the training rows (the shards split N−1 ways). A worker's step:

1. it receives the server's version and the current values of the rows its next batch touches
   (the embedding rows only, never the whole table) and of the dense layers, and writes them
   into its replica;
2. it computes the batch's gradient there (the torch loop: autograd, sparse embedding rows);
3. it pushes the touched rows' gradients, the dense gradients and the version it pulled, and
   in the same request asks for the rows of the batch after.

The server answers requests in the order they come (a receive from any worker), applies each
push at once through :class:`trainers.staleness.StaleServer` (SGD with η_τ = η₀ / max(τ, 1),
τ = the server's version minus the pulled one, pushes above ``train.max_staleness`` dropped and
counted), then answers the pull. It alone keeps the clock, the learning-rate schedule (planned
over the budget from its measured pushes per second, as the other modes plan theirs), the
evaluations (on the whole validation split, each time the workers have pushed an epoch's worth
of steps between them), convergence (ρ and patience) and the checkpoints, which hold each
worker's place in its epoch as of its last applied push, so that a rerun after a killed rank
goes on from there. When it stops (budget, convergence) it answers each worker's next request
with "stop"; a worker that reaches ``train.epochs`` says it is done.

Every message travels on the CPU through gloo, also when the workers train on GPUs (NCCL has no
receive from any source): the job makes a gloo group for it where the default group is not one.
A request is a header of :data:`HEADER` float64 fields, then the gradient rows (int64), their
values (in ``train.exchange_precision``), the dense gradients, and the rows to pull; a reply is a
header, then the pulled rows' values and the dense parameters (in the model's precision).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from core.config import TrainConfig
from trainers.data import ShardData
from trainers.model import NgramClassifier, split_like
from trainers.staleness import StaleServer, staleness_lr_cap

REQUEST, REPLY = 1, 2  # message tags: a worker's request, the server's reply
# request header fields
(PULLED, N_GRAD, N_PULL, EPOCH, STEP_IN_EPOCH, STEPS, LOSS, KIND, STEPS_PER_EPOCH, EXAMPLES,
 COMPUTE_S, COMM_S) = range(12)  # fmt: skip
HEADER = 12
HELLO, PUSH, DONE = 0.0, 1.0, 2.0  # request kinds: first pull only; push and pull; last push
STOP_REASONS = ("", "budget", "converged", "epochs")  # a reply's second field (0: go on)
PLAN_EVERY = 50  # applied pushes between re-plans of the learning-rate schedule
OBSERVED_AFTER = 20  # pushes before the staleness cap uses their 95th percentile


class Trainer(Protocol):
    """What the server and the workers use of ``trainers.trainer.Trainer`` (which runs them)."""

    cfg: TrainConfig
    model: NgramClassifier
    rank: int
    world_size: int
    train_data: ShardData
    wire_dtype: torch.dtype | None
    async_state: dict[str, Any]
    step: int
    time_used_before: float
    stopped_by: str | None
    history: list[dict[str, float]]
    losses: list[tuple[int, float]]

    def loss_of(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor: ...
    def lr_factor_now(self) -> float: ...
    def progress_after(self, step: int) -> None: ...
    def start_schedule(self, cap: int | None) -> None: ...
    def plan_pushes(self, start: float, launch: tuple[float, int], version: int,
                    cap: int | None) -> None: ...  # fmt: skip
    def evaluate(self, batch_size: int = 4096, *, reduce: bool = True) -> dict[str, float]: ...
    def log_evaluation(self, epoch: int, metrics: dict[str, float], loss: float) -> None: ...
    def converged(self, val_loss: float) -> bool: ...
    def write_checkpoint(self, time_used: float) -> None: ...
    def maybe_fault(self) -> None: ...


def worker_share(rank: int, world_size: int) -> tuple[int, int]:
    """The share of the training rows worker ``rank`` (1 … N−1) reads, as ``(index, of)``: the
    workers split them N−1 ways; the server (rank 0) reads none."""
    return rank - 1, world_size - 1


@dataclass
class WorkerPlace:
    """Where a worker is, as of its last applied (or dropped) push: kept in checkpoints."""

    epoch: int = 0
    step_in_epoch: int = 0
    steps: int = 0


@dataclass
class ServerStats:
    """What the server counts for the run's record."""

    bytes_in: int = 0
    bytes_out: int = 0
    requests: int = 0
    compute_s: dict[int, float] = field(default_factory=dict)  # per worker, its latest totals
    comm_s: dict[int, float] = field(default_factory=dict)
    examples: int = 0


def _group() -> dist.ProcessGroup | None:
    """The group the messages travel in: the default one under gloo, else a gloo group of all
    ranks (made by every rank, in the same order)."""
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


HALF = (torch.float16, torch.bfloat16)  # sent as their 16 bits: gloo's bf16 is not to be relied on


def _send(tensor: torch.Tensor, dst: int, group: dist.ProcessGroup | None, tag: int) -> int:
    tensor = tensor.contiguous()
    dist.send(
        tensor.view(torch.int16) if tensor.dtype in HALF else tensor, dst, group=group, tag=tag
    )
    return tensor.numel() * tensor.element_size()


def _recv(
    shape: tuple[int, ...], dtype: torch.dtype, src: int, group: dist.ProcessGroup | None, tag: int
) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype)
    dist.recv(tensor.view(torch.int16) if dtype in HALF else tensor, src, group=group, tag=tag)
    return tensor


# --- the server -----------------------------------------------------------------------------


def serve(trainer: Trainer) -> dict[str, Any]:
    """Rank 0's loop: answer the workers until every one has stopped; the run's result."""
    cfg, group = trainer.cfg, _group()
    emb, dense = trainer.model.embedding.weight, trainer.model.dense_parameters()
    dim, dtype = emb.shape[1], emb.dtype
    wire = trainer.wire_dtype or dtype
    dense_numel = sum(p.numel() for p in dense)
    workers = trainer.world_size - 1
    state = trainer.async_state
    server = StaleServer(
        [emb.data, *(p.data for p in dense)], lr0=cfg.lr, max_staleness=cfg.max_staleness,
        version=trainer.step, applied=state.get("applied", 0), dropped=state.get("dropped", 0),
        staleness=Counter({int(k): v for k, v in state.get("staleness", {}).items()}),
    )  # fmt: skip
    places = [WorkerPlace(*p) for p in state.get("places", [[0, 0, 0]] * workers)]
    stats = ServerStats()
    start = time.monotonic() - trainer.time_used_before
    budget = cfg.time_budget_s
    waiting_s = 0.0
    capped, lr_cap = 0, math.nan  # pushes the staleness cap lowered the rate of; the last cap

    def receive() -> tuple[int, list[float], tuple | None, torch.Tensor | None]:
        nonlocal waiting_s
        header = torch.empty(HEADER, dtype=torch.float64)
        t0 = time.perf_counter()
        src = dist.recv(header, None, group=group, tag=REQUEST)
        waiting_s += time.perf_counter() - t0
        h = header.tolist()
        grads = pull = None
        if h[KIND] != HELLO:
            n = int(h[N_GRAD])
            rows = (
                _recv((n,), torch.int64, src, group, REQUEST)
                if n
                else torch.zeros(0, dtype=torch.int64)
            )
            values = (_recv((n, dim), wire, src, group, REQUEST) if n else torch.zeros(0, dim)).to(
                dtype
            )
            flat = _recv((dense_numel,), wire, src, group, REQUEST).to(dtype)
            # on the server's device (its GPU where the workers train on GPUs)
            grads = tuple(x.to(emb.device) for x in (rows, values, flat))
            stats.bytes_in += n * (8 + dim * wire.itemsize) + dense_numel * wire.itemsize
        if h[N_PULL] > 0:
            pull = _recv((int(h[N_PULL]),), torch.int64, src, group, REQUEST)
        stats.bytes_in += HEADER * 8 + (0 if pull is None else pull.numel() * 8)
        stats.requests += 1
        return src, h, grads, pull

    def reply(dst: int, pull: torch.Tensor | None, stop: str | None) -> None:
        code = 0.0 if stop is None else float(STOP_REASONS.index(stop))
        header = torch.tensor([float(server.version), code], dtype=torch.float64)
        stats.bytes_out += _send(header, dst, group, REPLY)
        if stop is None:
            if pull is not None:
                rows = emb.detach()[pull.to(emb.device)].cpu()  # gloo sends from CPU memory
                stats.bytes_out += _send(rows, dst, group, REPLY)
            stats.bytes_out += _send(torch.cat([p.detach().reshape(-1) for p in dense]).cpu(), dst,
                                     group, REPLY)  # fmt: skip

    def evaluate(loss: float) -> bool:
        """Evaluate the server's parameters on all of the validation rows; True where the run
        has converged."""
        metrics = trainer.evaluate(reduce=False)
        trainer.log_evaluation(len(trainer.history) + 1, metrics, loss)
        return trainer.converged(metrics["val_loss"])

    # every worker's first request (a pull only) tells its epoch length; none is answered
    # before all are in, so that the epoch's length in pushes is known
    hellos, steps_per_epoch = {}, {}
    for _ in range(workers):
        src, h, _, pull = receive()
        hellos[src], steps_per_epoch[src] = pull, int(h[STEPS_PER_EPOCH])
    epoch_pushes = sum(steps_per_epoch.values())
    cap = epoch_pushes * cfg.epochs if cfg.epochs else None
    trainer.start_schedule(cap)
    launch = (time.monotonic(), server.version)  # the schedule is planned in applied pushes
    launch_pushes = server.applied + server.dropped
    stopped_by = trainer.stopped_by
    stopped: set[int] = set()
    for src, pull in hellos.items():
        # a worker already through its epochs (a resumed run) is told so at once
        done = cfg.epochs is not None and places[src - 1].epoch >= cfg.epochs
        stop = stopped_by or ("epochs" if done else None)
        reply(src, pull, stop)
        if stop is not None:
            stopped.add(src)
    loss = math.nan
    while len(stopped) < workers:
        src, h, grads, pull = receive()
        if stopped_by is None and time.monotonic() - start >= budget:
            stopped_by = "budget"
        if grads is not None and stopped_by is None:
            rows, values, flat = grads
            server.lr0 = cfg.lr * trainer.lr_factor_now()
            if cfg.lambda_max is not None:  # the staleness-aware cap
                seen = sum(server.staleness.values())
                tau = (
                    int(_quantile(server.staleness, 0.95))
                    if seen >= OBSERVED_AFTER
                    else workers - 1
                )
                lr_cap = staleness_lr_cap(cfg.lambda_max, tau, cfg.auto_lr_safety)
                capped += server.lr0 > lr_cap
                server.lr0 = min(server.lr0, lr_cap)
            before = server.version
            applied = server.push([(rows, values), *split_like(flat, dense)], int(h[PULLED]))
            if applied:
                trainer.step = server.version
                trainer.progress_after(before)
            places[src - 1] = WorkerPlace(int(h[EPOCH]), int(h[STEP_IN_EPOCH]), int(h[STEPS]))
            stats.examples += int(h[EXAMPLES])
            loss = h[LOSS]
            if applied and trainer.step % 10 == 0:
                trainer.losses.append((trainer.step, loss))
            pushes = server.applied + server.dropped
            if pushes - launch[1] >= 20 and pushes % PLAN_EVERY == 0:
                trainer.plan_pushes(start, launch, server.version, cap)
            if pushes % epoch_pushes == 0:  # the workers pushed an epoch's worth between them
                if evaluate(loss):
                    stopped_by = "converged"
            if applied and cfg.checkpoint_every and server.applied % cfg.checkpoint_every == 0:
                trainer.async_state = _state(server, places)
                trainer.write_checkpoint(time.monotonic() - start)
        stats.compute_s[src], stats.comm_s[src] = h[COMPUTE_S], h[COMM_S]
        stop = stopped_by or ("epochs" if h[KIND] == DONE else None)
        reply(src, pull, stop)
        if stop is not None:
            stopped.add(src)
    time_used = time.monotonic() - start
    trainer.stopped_by = stopped_by or "epochs"
    if not trainer.history or trainer.history[-1]["step"] != trainer.step:
        evaluate(loss)
    trainer.async_state = _state(server, places)
    trainer.write_checkpoint(time_used)
    compute, comm = sum(stats.compute_s.values()), sum(stats.comm_s.values())
    pushes = server.applied + server.dropped - launch_pushes  # this launch's
    seconds = max(time_used - trainer.time_used_before, 1e-9)  # this launch's
    hist = server.staleness_histogram()
    return {
        "time_used_s": time_used,
        "samples_per_s": stats.examples / seconds,
        "step_time_s": compute / pushes if pushes else math.nan,
        "comm_fraction": comm / max(compute + comm, 1e-9) if compute + comm else math.nan,
        "bytes_per_step": (stats.bytes_in + stats.bytes_out) / max(stats.requests, 1),
        "train_loss": loss,
        "async_pushes_applied": server.applied,
        "async_pushes_dropped": server.dropped,
        "async_pushes_per_s": pushes / seconds,
        "async_server_idle_fraction": waiting_s / seconds,
        "async_staleness_p95": _quantile(hist, 0.95),
        "async_staleness_max": max(hist, default=0),
        "async_staleness": hist,
        **(
            {"async_lr_cap": lr_cap, "async_lr_capped_pushes": capped}
            if cfg.lambda_max is not None
            else {}
        ),
    }


def _state(server: StaleServer, places: list[WorkerPlace]) -> dict[str, Any]:
    """What a checkpoint keeps of the server besides the weights (plain values)."""
    return {
        "applied": server.applied,
        "dropped": server.dropped,
        "staleness": {str(k): v for k, v in server.staleness.items()},
        "places": [[p.epoch, p.step_in_epoch, p.steps] for p in places],
    }


def _quantile(histogram: dict[int, int], q: float) -> float:
    """The ``q`` quantile of the staleness histogram (0 when empty)."""
    total = sum(histogram.values())
    seen = 0
    for tau, count in sorted(histogram.items()):
        seen += count
        if seen >= q * total:
            return float(tau)
    return 0.0


# --- a worker -------------------------------------------------------------------------------


def work(trainer: Trainer) -> dict[str, Any]:
    """A worker's loop (ranks 1 … N−1): pull, compute, push until the server says stop or its
    epochs are done; what it did."""
    cfg, group = trainer.cfg, _group()
    data, batch_size = trainer.train_data, cfg.batch_size
    emb, dense = trainer.model.embedding.weight, trainer.model.dense_parameters()
    dim, dtype = emb.shape[1], emb.dtype
    wire = trainer.wire_dtype or dtype
    dense_numel = sum(p.numel() for p in dense)
    steps_per_epoch = math.ceil(data.num_rows / batch_size)
    if steps_per_epoch == 0:
        raise ValueError("no training rows on this worker: more data or fewer train.world_size")
    places = trainer.async_state.get("places")
    place = WorkerPlace(*places[trainer.rank - 1]) if places else WorkerPlace()
    trainer.step = first = place.steps
    max_epochs = cfg.epochs or math.inf
    compute_s = comm_s = 0.0

    def rows_of(p: WorkerPlace) -> np.ndarray:
        order = np.random.default_rng([cfg.seed, p.epoch, trainer.rank]).permutation(data.num_rows)
        return order[p.step_in_epoch * batch_size : (p.step_in_epoch + 1) * batch_size]

    def request(kind: float, pulled: int, grads: tuple | None, pull: torch.Tensor | None,
                loss: float, examples: int) -> None:  # fmt: skip
        header = torch.zeros(HEADER, dtype=torch.float64)
        header[[PULLED, KIND, EPOCH, STEP_IN_EPOCH, STEPS, LOSS, STEPS_PER_EPOCH]] = torch.tensor(
            [pulled, kind, place.epoch, place.step_in_epoch, place.steps, loss, steps_per_epoch],
            dtype=torch.float64,
        )
        header[[N_GRAD, N_PULL, EXAMPLES, COMPUTE_S, COMM_S]] = torch.tensor(
            [-1 if grads is None else len(grads[0]), 0 if pull is None else len(pull), examples,
             compute_s, comm_s], dtype=torch.float64,
        )  # fmt: skip
        _send(header, 0, group, REQUEST)
        if grads is not None:
            rows, values, flat = grads
            if len(rows):
                _send(rows, 0, group, REQUEST)
                _send(values.to(wire), 0, group, REQUEST)
            _send(flat.to(wire), 0, group, REQUEST)
        if pull is not None:
            _send(pull, 0, group, REQUEST)

    def answer(pull: torch.Tensor | None) -> tuple[int, str | None]:
        header = _recv((2,), torch.float64, 0, group, REPLY)
        version, code = int(header[0]), int(header[1])
        if code == 0:
            if pull is not None:
                values = _recv((len(pull), dim), dtype, 0, group, REPLY)
            flat = _recv((dense_numel,), dtype, 0, group, REPLY)
            with torch.no_grad():
                if pull is not None:
                    emb.index_copy_(0, pull.to(emb.device), values.to(emb.device))
                for p, value in zip(dense, split_like(flat, dense), strict=True):
                    p.copy_(value)  # copy_ moves it to the parameter's device
        return version, STOP_REASONS[code] if code else None

    def touched(rows: np.ndarray) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        batch = data.batch(rows)
        ids = torch.unique(batch[0])
        return batch, ids if len(ids) else None  # nothing to pull for a batch without ids

    done = place.epoch >= max_epochs
    batch, pull = touched(rows_of(place)) if not done else (None, None)
    stop: str | None
    t0 = time.perf_counter()
    request(HELLO, 0, None, pull, math.nan, 0)
    version, stop = answer(pull)
    comm_s += time.perf_counter() - t0
    while stop is None and not done:
        t0 = time.perf_counter()
        for p in trainer.model.parameters():
            p.grad = None
        loss = trainer.loss_of(batch)
        loss.backward()
        rows, values = _row_gradients(emb.grad, pull)
        flat = torch.cat([p.grad.reshape(-1) for p in dense]).cpu()
        examples = len(batch[2])
        place.step_in_epoch += 1
        place.steps += 1
        trainer.step = place.steps
        if place.step_in_epoch >= steps_per_epoch:
            place.epoch, place.step_in_epoch = place.epoch + 1, 0
        done = place.epoch >= max_epochs
        batch, pull = (None, None) if done else touched(rows_of(place))
        compute_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        request(
            DONE if done else PUSH,
            version,
            (rows, values, flat),
            pull,
            float(loss.detach()),
            examples,
        )
        trainer.maybe_fault()
        version, stop = answer(pull)
        comm_s += time.perf_counter() - t0
    trainer.stopped_by = stop or "epochs"
    return {
        "time_used_s": compute_s + comm_s,
        "step_time_s": compute_s / max(place.steps - first, 1),  # this launch's steps
        "comm_fraction": comm_s / max(compute_s + comm_s, 1e-9),
    }


def _row_gradients(
    grad: torch.Tensor, rows: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding gradient as ``(rows, values)`` on the CPU: a sparse gradient's own rows
    (CPU training), or the batch's ``rows`` of a dense one (GPUs)."""
    if grad is None or rows is None:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, 0)
    if grad.is_sparse:
        grad = grad.coalesce()
        return grad.indices()[0].cpu(), grad.values().cpu()
    rows = rows.to(grad.device)
    return rows.cpu(), grad.index_select(0, rows).cpu()
