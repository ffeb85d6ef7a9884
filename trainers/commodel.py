"""The α-β communication model: what more workers would buy, per mode, from one worker's measured
step and the bytes each mode sends.

A message of B bytes costs α + B/β (α the latency, β the bandwidth). Two links are measured on
this machine, because gloo's collectives cost several times its point-to-point messages: the
link of one send and its receive (async's requests and replies), and the link of one round of
an all-gather (sync's exchange, local SGD's average). Per step of N workers, each computing a
batch of b rows in T_c seconds (slower by N/cores where the workers outnumber the cores they
share):

- **sync** (the row exchange: an all-gather of every worker's touched rows and dense gradients,
  B_x bytes a worker): a ring all-gather takes N − 1 rounds of one message each, and every worker
  then sums and applies the rows of N workers, not one: T_m more work for each other worker's
  rows. T = T_c + (N − 1)(T_m + α + B_x/β);
- **local_sgd** (an all-reduce of the rows some worker touched and the dense layers, B_a bytes,
  every H = ``sync_every`` steps): a ring all-reduce sends 2(N − 1) messages of B_a/N, and the
  average has work of its own, T_a (finding the touched rows, gathering and scattering them), so
  T = T_c + (T_a + 2(N − 1)(α + B_a/(Nβ))) / H;
- **async** (N − 1 workers and a server): a worker's cycle is its step, the M = 8 messages of a
  push (a request of five: header, rows, row gradients, dense gradients, rows to pull; a reply of
  three: header, rows, dense layers; M·α + B_p/β for the push's B_p bytes both ways) and the
  server's work on it (T_s). The server serves one push at a time, from its header to its reply:
  T_s + (M − 1)α + B_p/β (the header's latency overlaps its wait), so
  pushes/s = min((N − 1)/cycle, 1/(T_s + (M − 1)α + B_p/β)).

Where the N processes outnumber the cores, each runs at cores/N of one: every term above is slower
by N/cores. samples/s is b per step per worker (per push in async); efficiency is samples/s over
N times one worker's b/T_c. Times are means, as samples/s are.
"""

from __future__ import annotations

import dataclasses
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
from trainers.exchange import ReplicaAverage, RowExchange, gather_flat
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
    merge_s: float = 0.0  # sync: T_m, summing and applying one more worker's rows a step
    loaded_compute_s: float | None = None  # T_c of each of 2 workers computing at once
    average_s: float = 0.0  # local_sgd: T_a, an average's work besides its collectives


@dataclass(frozen=True)
class Prediction:
    mode: str
    workers: int
    step_s: float  # seconds a step (async: a worker's cycle)
    samples_per_s: float
    efficiency: float  # samples/s over workers × one worker's


MESSAGES_PER_PUSH = 8
"""async: the messages of one push, request (5) and reply (3), as ``trainers.async_ps`` sends
them."""


def predict(
    costs: StepCosts, link: Link, mode: str, workers: int, collective: Link | None = None
) -> Prediction:
    """The α-β model's step time, samples/s and efficiency of ``mode`` at ``workers`` (the
    world size: async's includes its server; it needs 2). ``link`` carries async's messages,
    ``collective`` a round of sync's and local SGD's collectives (default: ``link``)."""
    n, b = workers, costs.batch
    ring = collective or link
    # the step of one worker alone, or of each of several sharing this machine's memory and caches
    shared = costs.loaded_compute_s if n > 1 and costs.loaded_compute_s else costs.compute_s
    crowded = max(1.0, n / max(costs.cores, 1))  # processes per core, where more than one
    single = b / costs.compute_s
    if mode == "sync":
        step = crowded * (shared + (n - 1) * (costs.merge_s + ring.message(costs.exchange_bytes)))
        rate = n * b / step
    elif mode == "local_sgd":
        reduce = costs.average_s + 2 * (n - 1) * ring.message(costs.average_bytes / n)
        step = crowded * (shared + (reduce / costs.sync_every if n > 1 else 0.0))
        rate = n * b / step
    elif mode == "async":
        if n < 2:
            return Prediction(mode, n, math.nan, math.nan, math.nan)
        messages = costs.push_bytes / link.bandwidth
        step = crowded * (shared + MESSAGES_PER_PUSH * link.latency_s + messages + costs.server_s)
        serve = crowded * (costs.server_s + (MESSAGES_PER_PUSH - 1) * link.latency_s + messages)
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

    times, rows, server, merge = [], [], [], []
    emb = model.embedding.weight
    previous = None  # the last step's touched rows and their gradients: "another worker's"
    for i in range(steps + 5):
        t0 = time.perf_counter()  # the batch's gathering too: a trainer's step does it
        ids, offsets, y, w = batch()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        losses = F.cross_entropy(model(ids, offsets), y.clamp(min=0), reduction="none")
        (losses * w).sum().div(w.sum().clamp(min=1e-12)).backward()
        for opt in optimizers:
            opt.step()
        elapsed = time.perf_counter() - t0
        grad = emb.grad.coalesce()
        mine = (grad.indices()[0], grad.values())
        if i >= 5:
            times.append(elapsed)
            # sync's merge: one more worker's rows summed into the step's gradient and applied
            merge.append(_merged_step(emb, optimizers[0], [mine, previous])
                         - _merged_step(emb, optimizers[0], [mine]))  # fmt: skip
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
        previous = mine
    r = float(np.mean(rows))
    exchange = r * (8 + dim * wire) + dense_numel * wire
    request = r * (8 + dim * wire) + dense_numel * wire + r * 8
    reply = r * dim * emb.element_size() + dense_numel * emb.element_size()
    average = {}
    for n in workers:  # the rows n workers touch in sync_every steps, the touched flags, dense
        union = torch.unique(torch.cat([batch()[0] for _ in range(n * t.sync_every)]))
        average[n] = (len(union) * dim + dense_numel) * emb.element_size() + emb.shape[0]
    costs = StepCosts(
        compute_s=float(np.mean(times)), batch=t.batch_size, cores=os.cpu_count() or 1,
        exchange_bytes=exchange, average_bytes=max(average.values()), sync_every=t.sync_every,
        push_bytes=request + reply + HEADERS, server_s=float(np.mean(server)),
        merge_s=max(float(np.mean(merge)), 0.0),
    )  # fmt: skip
    return costs, average


def _merged_step(emb: torch.Tensor, optimizer: torch.optim.Optimizer, parts: list) -> float:
    """Seconds to sum ``parts`` (each rows and their gradients) into one sparse gradient, as
    the row exchange does with every worker's, and apply it."""
    t0 = time.perf_counter()
    ids = torch.cat([rows for rows, _ in parts])
    values = torch.cat([values for _, values in parts]) / len(parts)
    emb.grad = torch.sparse_coo_tensor(ids.unsqueeze(0), values, emb.shape).coalesce()
    optimizer.step()
    return time.perf_counter() - t0


def _links(rank: int, store_dir: str, sizes: Sequence[int], reps: int, out: str) -> None:
    store = dist.FileStore(str(Path(store_dir) / "store"), 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        seconds: dict[str, list[float]] = {"p2p": [], "gather": []}
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
            seconds["p2p"].append((time.perf_counter() - t0) / reps / 2)  # one way
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(reps):  # one round of a ring: each rank's buffer to the other
                gather_flat(buffer, 2)
            seconds["gather"].append((time.perf_counter() - t0) / reps)
        if rank == 0:
            Path(out).write_text(json.dumps(seconds))
    finally:
        dist.destroy_process_group()


def measure_link(reps: int = 100) -> tuple[Link, Link]:
    """α and β of gloo between two processes of this machine (loopback), for a message (half
    the round trip of a send and its receive) and for one round of a collective (an all-gather
    of two ranks, as the row exchange calls it): each from a 4-byte and a 1 MB buffer, α the
    small one's time, β the bytes over the large one's extra time."""
    sizes = (4, 1 << 20)
    with tempfile.TemporaryDirectory(prefix="zipfline-link-") as folder:
        out = str(Path(folder) / "seconds.json")
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        mp.spawn(_links, args=(folder, sizes, reps, out), nprocs=2, join=True)
        seconds = json.loads(Path(out).read_text())

    def fitted(small: float, large: float) -> Link:
        return Link(latency_s=small, bandwidth=sizes[1] / max(large - small, 1e-9))

    return fitted(*seconds["p2p"]), fitted(*seconds["gather"])


def _loaded(rank: int, store_dir: str, spec: TrainSpec, steps: int, out: str) -> None:
    """Two processes computing at once: the torch loop alone, then with the row exchange (sync),
    then averaging every ``sync_every`` steps (local SGD), then as an async worker (rank 1) and
    its server (rank 0) with a push's eight messages."""
    torch.set_num_threads(1)
    store = dist.FileStore(str(Path(store_dir) / "store"), 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        t = spec.train
        data = read_split(Path(spec.shard_dir), "train", rank, 2)
        labels = load_manifest(Path(spec.shard_dir))["labels"]
        torch.manual_seed(t.seed)
        model = NgramClassifier(spec.model_spec(max(len(labels), 1)), sparse=True)
        optimizers = build_optimizers(model, t)
        exchange = RowExchange(model, 2)
        average = ReplicaAverage(model, 2)
        touched = torch.zeros(model.embedding.weight.shape[0], dtype=torch.uint8)
        averaged: list[int] = []
        emb, dense = model.embedding.weight, model.dense_parameters()
        flat = torch.cat([p.detach().reshape(-1) for p in dense])
        rng = np.random.default_rng([t.seed, rank])
        seconds: dict[str, float] = {}

        def step(sync: bool) -> torch.Tensor:
            ids, offsets, y, w = data.batch(rng.integers(0, data.num_rows, size=t.batch_size))
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            losses = F.cross_entropy(model(ids, offsets), y.clamp(min=0), reduction="none")
            (losses * w).sum().div(w.sum().clamp(min=1e-12)).backward()
            if sync:
                exchange()
            for opt in optimizers:
                opt.step()
            return ids

        for phase in ("compute", "sync", "local_sgd", "async"):
            dist.barrier()
            times = []
            # local SGD: four averages at least, and one untimed first (its buffer's allocation)
            count = max(steps, 4 * t.sync_every) if phase == "local_sgd" else steps
            for i in range(count + 5):
                t0 = time.perf_counter()
                if phase == "local_sgd":
                    touched[step(False)] = 1
                    if i == 4 or (i >= 5 and (i - 4) % t.sync_every == 0):
                        averaged.append(average(touched))
                elif phase != "async":
                    step(phase == "sync")
                elif rank == 1:  # the worker: a step, its request (5 messages), the reply (3)
                    rows = torch.unique(step(False))
                    n = torch.tensor([float(len(rows))], dtype=torch.float64)
                    for part in (n.repeat(12), rows, emb.detach()[rows], flat, rows):
                        dist.send(part.contiguous(), 0)
                    for part in (n.repeat(2), emb.detach()[rows].clone(), flat.clone()):
                        dist.recv(part, 0)
                else:  # the server: the request, its work on it, the reply
                    header = torch.empty(12, dtype=torch.float64)
                    dist.recv(header, 1)
                    n = int(header[0])
                    rows, values = torch.empty(n, dtype=torch.int64), torch.empty(n, emb.shape[1])
                    grads = torch.empty_like(flat)
                    for part in (rows, values, grads, rows):
                        dist.recv(part, 1)
                    with torch.no_grad():
                        emb.index_add_(0, rows, values, alpha=-1e-9)
                        flat.add_(grads, alpha=-1e-9)
                        pulled = emb[rows]
                    for part in (header[:2].clone(), pulled, flat):
                        dist.send(part.contiguous(), 1)
                if i >= 5:
                    times.append(time.perf_counter() - t0)
            seconds[phase] = float(np.mean(times))
        seconds["average_bytes"] = float(np.mean(averaged[1:]))
        if rank == 1:
            Path(out).write_text(json.dumps(seconds))
    finally:
        dist.destroy_process_group()


def measure_loaded(spec: TrainSpec, steps: int = 200) -> dict[str, float]:
    """Mean seconds a step of each of two workers computing at once (``compute``), a sync step
    with the row exchange (``sync``), a local SGD step with its averages spread over the steps
    (``local_sgd``, and ``average_bytes`` the bytes of one average), and an async worker's push
    cycle with its server (``async``): what the collectives and messages really cost here, waits
    for the other process, Python and gloo's threads included, which an idle link's α and β do
    not see."""
    with tempfile.TemporaryDirectory(prefix="zipfline-loaded-") as folder:
        out = str(Path(folder) / "seconds.json")
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        mp.spawn(_loaded, args=(folder, spec, steps, out), nprocs=2, join=True)
        return json.loads(Path(out).read_text())


def fitted_links(costs: StepCosts, p2p: Link, ring: Link, loaded: dict[str, float]) -> tuple[
        StepCosts, Link, Link]:  # fmt: skip
    """The costs with each of two workers' compute and local SGD's work of an average, and the
    two links with the latency that makes the model's 2-worker sync step and async cycle what
    :func:`measure_loaded` measured (their bandwidths as measured idle; a latency never below
    the idle one; T_a what the 2-worker average took beyond its collectives)."""
    sync_rest = loaded["sync"] - loaded["compute"] - costs.merge_s
    ring = Link(max(ring.latency_s, sync_rest - costs.exchange_bytes / ring.bandwidth),
                ring.bandwidth)  # fmt: skip
    one_average = (loaded["local_sgd"] - loaded["compute"]) * costs.sync_every
    costs = dataclasses.replace(
        costs, loaded_compute_s=loaded["compute"],
        average_s=max(0.0, one_average - 2 * ring.message(loaded["average_bytes"] / 2)),
    )  # fmt: skip
    async_rest = loaded["async"] - loaded["compute"] - costs.server_s
    p2p = Link(max(p2p.latency_s, (async_rest - costs.push_bytes / p2p.bandwidth)
                   / MESSAGES_PER_PUSH), p2p.bandwidth)  # fmt: skip
    return costs, p2p, ring
