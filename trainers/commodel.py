"""The α-β communication model: what more workers would buy, per mode, from one worker's measured
step and the bytes each mode sends.

A message of B bytes costs α + B/β (α the latency, β the bandwidth). Per step of N workers, each
computing a batch of b rows in T_c seconds (slower by N/cores where the workers outnumber the
cores they share):

- **sync** (the row exchange: an all-gather of every worker's touched rows and dense gradients,
  B_x bytes a worker): a ring all-gather takes N − 1 rounds of one message each, so
  T = T_c + (N − 1)(α + B_x/β);
- **local_sgd** (an all-reduce of the rows some worker touched and the dense layers, B_a bytes,
  every H = ``sync_every`` steps): a ring all-reduce sends 2(N − 1) messages of B_a/N, so
  T = T_c + 2(N − 1)(α + B_a/(Nβ)) / H;
- **async** (N − 1 workers and a server): a worker's cycle is its step, a request and a reply
  (2α + B_p/β for the push's B_p bytes both ways) and the server's work on it (T_s); the server
  serves one push at a time, so pushes/s = min((N − 1)/cycle, 1/(T_s + B_p/β)).

samples/s is b per step per worker (per push in async); efficiency is samples/s over N times one
worker's b/T_c.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from trainers.data import load_manifest, read_split
from trainers.model import NgramClassifier
from trainers.spec import TrainSpec
from trainers.trainer import build_optimizers

MODES = ("sync", "local_sgd", "async")


@dataclass(frozen=True)
class Link:
    """A network between workers: latency α (seconds a message) and bandwidth β (bytes/s)."""

    latency_s: float
    bandwidth: float

    def message(self, nbytes: float) -> float:
        """Seconds for one message of ``nbytes``: α + B/β."""
        return self.latency_s + nbytes / self.bandwidth


@dataclass(frozen=True)
class StepCosts:
    """One worker's measured step on this data and model, and what each mode sends."""

    compute_s: float  # T_c: forward, backward and update of one batch
    batch: int  # b: rows a worker's step (or push) learns from
    cores: int  # cores the workers share: compute slows by N/cores beyond them
    exchange_bytes: float  # sync: B_x, one worker's rows and dense gradients per step
    average_bytes: float  # local_sgd: B_a, the rows and dense layers one average reduces
    sync_every: int  # local_sgd: H, steps between averages
    push_bytes: float  # async: B_p, a push's request and reply together
    server_s: float  # async: T_s, the server's work on one push


@dataclass(frozen=True)
class Prediction:
    mode: str
    workers: int
    step_s: float  # seconds a step (async: a worker's cycle)
    samples_per_s: float
    efficiency: float  # samples/s over workers × one worker's


def predict(costs: StepCosts, link: Link, mode: str, workers: int) -> Prediction:
    """The α-β model's step time, samples/s and efficiency of ``mode`` at ``workers`` (the
    world size: async's includes its server; it needs 2)."""
    n, b = workers, costs.batch
    compute = costs.compute_s * max(1.0, n / max(costs.cores, 1))
    single = b / costs.compute_s
    if mode == "sync":
        step = compute + (n - 1) * link.message(costs.exchange_bytes)
        rate = n * b / step
    elif mode == "local_sgd":
        reduce = 2 * (n - 1) * link.message(costs.average_bytes / n) if n > 1 else 0.0
        step = compute + reduce / costs.sync_every
        rate = n * b / step
    elif mode == "async":
        if n < 2:
            return Prediction(mode, n, math.nan, math.nan, math.nan)
        step = compute + 2 * link.latency_s + costs.push_bytes / link.bandwidth + costs.server_s
        serve = costs.server_s + costs.push_bytes / link.bandwidth
        rate = b * min((n - 1) / step, 1.0 / serve if serve > 0 else math.inf)
    else:
        raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
    return Prediction(mode, n, step, rate, rate / (n * single))


# --- measuring on this data and model -------------------------------------------------------

HEADERS = 12 * 8 + 2 * 8  # async: a request's header and a reply's


def measure_costs(spec: TrainSpec, workers: Sequence[int], steps: int = 30) -> tuple[StepCosts,
                                                                                    dict[int, float]]:  # fmt: skip
    """One worker's step on the spec's shards (the torch loop, ``steps`` timed after a few
    untimed), the bytes each mode sends for the batches it drew, and the async server's work on
    a push; with local SGD's bytes per average for each worker count (the rows that many
    workers touch in ``sync_every`` steps)."""
    t = spec.train
    data = read_split(Path(spec.shard_dir), "train", 0, 1)
    labels = load_manifest(Path(spec.shard_dir))["labels"]
    torch.manual_seed(t.seed)
    model = NgramClassifier(spec.model_spec(max(len(labels), 1)), sparse=True)
    optimizers = build_optimizers(model, t)
    rng = np.random.default_rng(t.seed)
    dim = model.embedding.weight.shape[1]
    dense = model.dense_parameters()
    dense_numel = sum(p.numel() for p in dense)
    # "fp32" on the wire means as computed (fp64 for an fp64 model)
    wire = 2 if t.exchange_precision in ("fp16", "bf16") else model.embedding.weight.element_size()

    def batch() -> tuple[torch.Tensor, ...]:
        return data.batch(rng.integers(0, data.num_rows, size=min(t.batch_size, data.num_rows)))

    times, rows, server = [], [], []
    emb = model.embedding.weight
    for i in range(steps + 5):
        ids, offsets, y, w = batch()
        t0 = time.perf_counter()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        losses = F.cross_entropy(model(ids, offsets), y.clamp(min=0), reduction="none")
        (losses * w).sum().div(w.sum().clamp(min=1e-12)).backward()
        for opt in optimizers:
            opt.step()
        if i >= 5:
            times.append(time.perf_counter() - t0)
            touched = torch.unique(ids)
            rows.append(len(touched))
            # the server's work on one push: apply the rows' and dense gradients, gather a pull
            values = torch.randn(len(touched), dim)
            grads = [torch.randn_like(p) for p in dense]
            t0 = time.perf_counter()
            with torch.no_grad():
                emb.index_add_(0, touched, values, alpha=-1e-9)
                for p, g in zip(dense, grads, strict=True):
                    p.add_(g, alpha=-1e-9)
                _ = torch.cat([emb[touched].reshape(-1), *(p.reshape(-1) for p in dense)])
            server.append(time.perf_counter() - t0)
    r = float(np.mean(rows))
    exchange = r * (8 + dim * wire) + dense_numel * wire
    request = r * (8 + dim * wire) + dense_numel * wire + r * 8
    reply = r * dim * emb.element_size() + dense_numel * emb.element_size()
    average = {}
    for n in workers:  # the rows n workers touch in sync_every steps, the touched flags, dense
        union = torch.unique(torch.cat([batch()[0] for _ in range(n * t.sync_every)]))
        average[n] = (len(union) * dim + dense_numel) * emb.element_size() + emb.shape[0]
    costs = StepCosts(
        compute_s=float(np.median(times)), batch=t.batch_size, cores=os.cpu_count() or 1,
        exchange_bytes=exchange, average_bytes=max(average.values()), sync_every=t.sync_every,
        push_bytes=request + reply + HEADERS, server_s=float(np.median(server)),
    )  # fmt: skip
    return costs, average


def _ping_pong(rank: int, store_dir: str, sizes: Sequence[int], reps: int, out: str) -> None:
    store = dist.FileStore(str(Path(store_dir) / "store"), 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        seconds = []
        for size in sizes:
            buffer = torch.zeros(max(size // 4, 1), dtype=torch.float32)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(reps):
                if rank == 0:
                    dist.send(buffer, 1)
                    dist.recv(buffer, 1)
                else:
                    dist.recv(buffer, 0)
                    dist.send(buffer, 0)
            seconds.append((time.perf_counter() - t0) / reps / 2)  # one way
        if rank == 0:
            Path(out).write_text(json.dumps(seconds))
    finally:
        dist.destroy_process_group()


def measure_link(reps: int = 50) -> Link:
    """α and β of gloo between two processes of this machine (loopback): half the round trip of
    a 4-byte message, and the bytes over the extra time of a 4 MB one."""
    sizes = (4, 4 << 20)
    with tempfile.TemporaryDirectory(prefix="zipfline-link-") as folder:
        out = str(Path(folder) / "seconds.json")
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        mp.spawn(_ping_pong, args=(folder, sizes, reps, out), nprocs=2, join=True)
        small, large = json.loads(Path(out).read_text())
    return Link(latency_s=small, bandwidth=sizes[1] / max(large - small, 1e-9))
